"""Build inputs: labels must be printable text (one rule for `kvclip build` and the server),
class folder names are checked at request time, links out of a server folder are skipped."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvclip.cache_builder.sources import check_labels, discover_folder, discover_images
from kvclip.errors import DataError
from kvclip.service.build_requests import check_class_folders
from kvclip.service.schemas import BuildOptions
from tests.conftest import write_images

BAD = {"nul": "ca\x00t", "bel": "do\x07g", "rtl-override": "cat\u202egod", "isolate": "a\u2066b"}


@pytest.mark.parametrize("label", BAD.values(), ids=BAD.keys())
def test_control_and_bidi_characters_are_refused_naming_the_label(label):
    with pytest.raises(DataError, match="control character U\\+") as info:
        check_labels(["fine", label])
    assert repr(label) in str(info.value)
    with pytest.raises(ValidationError, match="control character"):
        BuildOptions(labels=["fine", label])


def test_printable_unicode_labels_stay_accepted():
    check_labels(["café", "東京", "chat noir", "smile 😀", "ZWJ family 👨‍👩‍👧"])


def test_class_folder_names_are_checked_at_request_time(tmp_path):
    write_images(tmp_path / "data" / "cat", 1)
    write_images(tmp_path / "data" / "sea\nlion", 1)
    with pytest.raises(DataError, match="class folder names: label 'sea\\\\nlion' spans several lines"):
        check_class_folders(tmp_path / "data")
    (tmp_path / "data" / "sea\nlion").rename(tmp_path / "data" / "sea lion")
    check_class_folders(tmp_path / "data")


def test_links_out_of_the_folder_are_skipped_and_reported(tmp_path):
    outside = tmp_path / "secret"
    write_images(outside, 2)
    data = tmp_path / "root" / "data"
    write_images(data / "cat", 2)
    (data / "cat" / "leak.png").symlink_to(outside / "img_000.png")
    (data / "dog").symlink_to(outside, target_is_directory=True)
    (data / "cat" / "inside.png").symlink_to(data / "cat" / "img_000.png")  # a link within stays
    skipped = []
    items = discover_folder(data, within=data, skipped=skipped)
    assert sorted(it.path.name for it in items) == ["img_000.png", "img_001.png", "inside.png"]
    assert {s.path for s in skipped} == {str(data / "cat" / "leak.png"), str(data / "dog")}
    assert all("symbolic link to outside" in s.reason for s in skipped)
    pool_skipped = []
    paths = discover_images(data, within=data, skipped=pool_skipped)
    assert all(p.resolve().is_relative_to(data) for p in paths)
    assert str(data / "cat" / "leak.png") in {s.path for s in pool_skipped}
    # `kvclip build` on a local folder still follows links (no `within`)
    assert len(discover_folder(data)) == 6
