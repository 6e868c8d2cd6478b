from pathlib import Path

import pytest

from kvclip.cache_builder.sources import (
    SupportItem,
    check_labels,
    discover_folder,
    order_labels,
    read_manifest,
    select_support,
)
from kvclip.errors import DataError
from tests.conftest import write_images


def test_folder_discovery_ignores_non_images(tmp_path):
    write_images(tmp_path / "cat", 3)
    write_images(tmp_path / "dog", 2)
    (tmp_path / "dog" / "notes.txt").write_text("x")
    (tmp_path / "README").write_text("x")
    items = discover_folder(tmp_path)
    assert [(i.label, i.path.name) for i in items] == [
        ("cat", "img_000.png"), ("cat", "img_001.png"), ("cat", "img_002.png"),
        ("dog", "img_000.png"), ("dog", "img_001.png")]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="no images"):
        discover_folder(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        discover_folder(tmp_path / "missing")


def test_manifest_rows_relative_paths_and_errors(tmp_path):
    write_images(tmp_path / "imgs", 2)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "imgs/img_000.png", "label": "a", "caption": "a red thing"}\n\n'
                        '{"path": "imgs/img_001.png", "label": "b"}\n')
    items = read_manifest(manifest)
    assert items[0] == SupportItem(tmp_path / "imgs/img_000.png", "a", "a red thing")
    assert items[1].caption is None
    manifest.write_text('{"path": "x.png"}\n')
    with pytest.raises(DataError, match=r"m.jsonl:1: .*\"label\""):
        read_manifest(manifest)
    manifest.write_text('not json\n')
    with pytest.raises(DataError, match="m.jsonl:1: not valid JSON"):
        read_manifest(manifest)


@pytest.mark.parametrize("labels", [["Dog", "dog"], ["golden_retriever", "golden retriever"], ["a", "a"]])
def test_duplicate_labels_are_an_error(labels):
    with pytest.raises(DataError, match="duplicate labels"):
        check_labels(labels)


@pytest.mark.parametrize("label", ["a\nb", "a\rb"])
def test_a_label_spanning_lines_is_an_error(label):
    with pytest.raises(DataError, match="several lines"):
        check_labels([label, "c"])


def test_labels_file_order_and_missing_class(tmp_path):
    items = [SupportItem(Path("a.png"), "cat"), SupportItem(Path("b.png"), "dog")]
    assert order_labels(items) == ["cat", "dog"]
    assert order_labels(items, ["dog", "cat"]) == ["dog", "cat"]
    with pytest.raises(DataError, match="no images for labels: bird"):
        order_labels(items, ["dog", "cat", "bird"])


def test_shots_are_seeded_and_replace_unreadable_files(tmp_path):
    write_images(tmp_path / "cat", 6)
    write_images(tmp_path / "dog", 6, seed=1)
    (tmp_path / "cat" / "broken.png").write_bytes(b"")
    items = discover_folder(tmp_path)
    a = select_support(items, ["cat", "dog"], shots=4, seed=3, progress=False)
    b = select_support(items, ["cat", "dog"], shots=4, seed=3, progress=False)
    c = select_support(items, ["cat", "dog"], shots=4, seed=4, progress=False)
    assert a.items == b.items and a.items != c.items
    assert a.per_class() == {"cat": 4, "dog": 4}
    assert all(i.path.name != "broken.png" for i in a.items)
    everything = select_support(items, ["cat", "dog"], shots=None, progress=False)
    assert everything.per_class() == {"cat": 6, "dog": 6}
    assert [s.path for s in everything.skipped] == [str(tmp_path / "cat" / "broken.png")]


def test_class_with_only_unreadable_images_is_an_error(tmp_path):
    write_images(tmp_path / "cat", 2)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="class 'dog' has no readable images"):
        select_support(discover_folder(tmp_path), ["cat", "dog"], shots=2, progress=False)
