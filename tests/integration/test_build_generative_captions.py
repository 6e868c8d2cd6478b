"""A build captioned by hf:MODEL, openai:URL or auto with a CoCa model: caption keys, manifest
record, and a rebuild that takes every generated caption from the caption cache and still
counts where each caption came from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvclip.build_summary import captioner_line
from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cli import main
from tests.conftest import write_images
from tests.fake_openai import FakeChat, serving
from tests.tiny_hf import save_tiny_blip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i, label in enumerate(["cat", "dog"]):
        write_images(root / label, 3, seed=i)
    return root


def test_hf_build_records_captioner_and_rebuild_uses_the_cache(data_dir, tiny_encoder, tmp_path, monkeypatch):
    torch.manual_seed(0)
    blip = save_tiny_blip(tmp_path / "blip")
    calls: list[int] = []
    from kvclip.cache_builder import hf_captioner

    original = hf_captioner.HFCaptioner.caption

    def counted(self, items, images=None):
        calls.append(len(items))
        return original(self, items, images)

    monkeypatch.setattr(hf_captioner.HFCaptioner, "caption", counted)
    config = dict(out=tmp_path / "caches" / "pets", data_dir=data_dir, captioner=f"hf:{blip}", views=2,
                  model="tiny-random", progress=False, device="cpu")
    first = build_cache(BuildConfig(**config), tiny_encoder)
    assert sum(calls) == 6
    assert first.manifest.captioner.name == "hf" and first.manifest.captioner.model == str(blip)
    assert "caps" in first.manifest.params.methods  # caption keys were built
    second = build_cache(BuildConfig(**config), tiny_encoder)
    assert sum(calls) == 6  # nothing captioned again
    assert (tmp_path / "caches" / "pets" / ".caption-cache" / "captions.sqlite").is_file()
    rows = [json.loads(line) for line in (second.path / "items.jsonl").read_text().splitlines()]
    first_rows = [json.loads(line) for line in (first.path / "items.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == [r["caption"] for r in first_rows] and all(r["caption"] for r in rows)


def test_cli_build_with_openai_captioner(data_dir, tmp_path, monkeypatch, capsys):
    chat = FakeChat(reply=lambda body: "a small picture")
    with serving(chat) as url:
        code = main(["build", str(data_dir), "--out", str(tmp_path / "caches" / "pets"), "--model", "tiny-random",
                     "--views", "1", "--quiet", "--json", "--captioner", f"openai:{url}", "--captioner-model", "v",
                     "--caption-prompt", "One sentence, please.", "--caption-cache", str(tmp_path / "cc")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["captioner"]["name"] == "openai" and report["captioner"]["prompt"] == "One sentence, please."
    assert len(chat.requests) == 6
    assert (tmp_path / "cc" / "captions.sqlite").is_file()


def test_auto_counts_stay_right_on_a_rebuild_from_the_caption_cache(tiny_encoder, tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i, label in enumerate(["cat", "dog"]):
        first_image = write_images(data / label, 3, seed=i)[0]
        first_image.with_suffix(".txt").write_text(f"a {label} from a caption file")
    generated: list[int] = []
    from kvclip.cache_builder import captioners

    original = captioners.CocaCaptioner.caption

    def counted(self, items, images=None):
        generated.append(len(items))
        return original(self, items, images)

    monkeypatch.setattr(captioners.CocaCaptioner, "caption", counted)
    config = dict(out=tmp_path / "caches" / "pets", data_dir=data, captioner="auto", captioner_model="tiny-coca-random",
                  views=1, model="tiny-random", progress=False, device="cpu")
    first = build_cache(BuildConfig(**config), tiny_encoder).manifest.captioner
    assert (first.sidecar, first.generated, first.uncaptioned, first.cached) == (2, 4, 0, 0)
    assert sum(generated) == 4  # only the images without a caption file

    edited = data / "cat" / "img_000.txt"
    edited.write_text("an edited caption")  # caption files are read again on every build, never cached
    result = build_cache(BuildConfig(**config), tiny_encoder)
    again = result.manifest.captioner
    assert (again.sidecar, again.generated, again.uncaptioned, again.cached) == (2, 4, 0, 4)
    assert sum(generated) == 4  # nothing generated again
    rows = [json.loads(line) for line in (result.path / "items.jsonl").read_text().splitlines()]
    assert {r["caption"] for r in rows if r["path"] == str(edited.with_suffix(".png"))} == {"an edited caption"}
    assert captioner_line(again.model_dump(mode="json")) == (
        "captions: auto, 2 from caption files, 4 generated (4 from the caption cache); every image captioned "
        "(serves caps too)")
