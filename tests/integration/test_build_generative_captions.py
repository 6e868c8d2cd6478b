"""A build captioned by hf:MODEL or openai:URL: caption keys, manifest record, and a rebuild that
takes every caption from the caption cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
