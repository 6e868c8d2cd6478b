"""Builds with Stable Diffusion support images from a tiny random pipeline: CapS prompts from real
images' captions, SuS-SD prompts for labels alone, provenance in items and manifest, resuming."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cli import main
from kvclip.errors import DataError
from tests.conftest import write_images
from tests.tiny_hf import save_tiny_stable_diffusion


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def captioned_data(tmp_path_factory) -> Path:
    """Two classes of two images, each with a sidecar caption."""
    root = tmp_path_factory.mktemp("data")
    for i, label in enumerate(["cat", "dog"]):
        for path in write_images(root / label, 2, seed=i):
            path.with_suffix(".txt").write_text(f"a {label} number {path.stem[-1]} on a rug")
    return root


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in (result.path / "items.jsonl").read_text().splitlines()]


def test_caps_build_renders_from_captions_and_records_provenance(captioned_data, tiny_sd, tiny_encoder, tmp_path):
    config = BuildConfig(out=tmp_path / "caches" / "pets", data_dir=captioned_data, model="tiny-random", views=1,
                         progress=False, device="cpu", synthesize=3, sd_model=str(tiny_sd), sd_steps=2)
    result = build_cache(config, tiny_encoder)
    rows = _rows(result)
    assert [r["origin"] for r in rows] == ["real"] * 2 + ["synthetic"] * 3 + ["real"] * 2 + ["synthetic"] * 3
    synthetic = [r for r in rows if r["origin"] == "synthetic"]
    real_captions = {r["caption"] for r in rows if r["origin"] == "real"}
    for row in synthetic:
        assert row["caption"] == row["prompt"]
        head, caption = row["prompt"].split(". ", 1)
        assert head == f"A photo of {row['label']}" and caption.rstrip(".").lower() in real_captions
    m = result.manifest
    assert m.generator.model == str(tiny_sd) and m.generator.per_class == 3 and m.generator.steps == 2
    assert m.generator.support == "both" and m.generator.guidance == 9.5
    report = m.build_report
    assert report.origin_per_class == {"cat": {"real": 2, "synthetic": 3}, "dog": {"real": 2, "synthetic": 3}}
    assert (report.synthesis.rendered, report.synthesis.reused) == (6, 0)
    assert "synthesize" in report.timings_s and "caps" in m.params.methods

    again = build_cache(config, tiny_encoder)  # a restart renders nothing again
    assert (again.manifest.build_report.synthesis.rendered, again.manifest.build_report.synthesis.reused) == (0, 6)
    assert [r["path"] for r in _rows(again)] == [r["path"] for r in rows]


def test_labels_only_build_prompts_with_descriptions_and_serves_a_cache(tiny_sd, tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    (tmp_path / "descriptions.json").write_text(json.dumps({"dog": ["a loyal four-legged pet"]}))
    code = main(["build", "--labels", str(tmp_path / "labels.txt"), "--descriptions",
                 str(tmp_path / "descriptions.json"), "--out", str(tmp_path / "caches" / "zs"), "--model",
                 "tiny-random", "--views", "1", "--quiet", "--synthesize", "2", "--sd-model", str(tiny_sd),
                 "--steps", "2", "--captioner", "none", "--support", "synthetic", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "synthetic: 4 rendered, 0 reused, 0 retried, 0 failed; per class (real/synthetic): cat 0/2, dog 0/2" in out
    rows = [json.loads(line) for line in next((tmp_path / "caches" / "zs").glob("versions/v*/items.jsonl")).read_text()
            .splitlines()]
    assert [r["prompt"] for r in rows] == ["A photo of a cat."] * 2 + ["A photo of dog. A loyal four-legged pet."] * 2


def test_support_choices_are_checked(captioned_data, tiny_encoder, tmp_path):
    base = dict(out=tmp_path / "c" / "x", data_dir=captioned_data, model="tiny-random", progress=False)
    with pytest.raises(DataError, match="--support synthetic needs --synthesize"):
        build_cache(BuildConfig(**base, support="synthetic"), tiny_encoder)
    with pytest.raises(DataError, match="--support real uses no rendered images"):
        build_cache(BuildConfig(**base, support="real", synthesize=1), tiny_encoder)
