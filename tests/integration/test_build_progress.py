"""Build progress and cancellation: the steps a monitor sees, and a cancel that publishes nothing."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvclip import artifact as store
from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cache_builder.progress import BuildCancelled, BuildMonitor, CallbackMonitor
from kvclip.service.registry import CacheRegistry
from tests.build_helpers import ProgressLog

LABELS = ["bag", "sandal", "trouser"]
COCA = {"captioner": "coca", "captioner_model": "tiny-coca-random"}  # a generative captioner, tiny and random


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, fashion_train) -> Path:
    """Three Fashion-MNIST classes with sidecar captions, and a labels file naming them."""
    root = tmp_path_factory.mktemp("progress")
    for label in LABELS:
        shutil.copytree(fashion_train / label, root / "data" / label)
    for image in (root / "data").rglob("*.png"):
        image.with_suffix(".txt").write_text(f"a photo of a {image.parent.name}")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


@pytest.fixture(scope="module")
def published(captioned, tiny_encoder, tmp_path_factory) -> Path:
    """A caches folder whose cache `c` has one version, v0001 (tests copy it)."""
    root = tmp_path_factory.mktemp("published") / "caches"
    build_cache(config(captioned, root / "c", captioner="none"), tiny_encoder)
    return root


def config(root: Path, out: Path, **overrides) -> BuildConfig:
    settings = dict(out=out, data_dir=root / "data", labels_file=root / "labels.txt", model="tiny-random",
                    shots=2, views=1, batch_size=2, captioner="sidecar", progress=False)
    return BuildConfig(**{**settings, **overrides})


def test_callback_monitor_reports_and_cancels():
    events, stop = [], [False]
    monitor = CallbackMonitor(lambda *e: events.append(e), lambda: stop[0])
    monitor.step("encoding", 5)
    monitor.advance(2)
    monitor.advance(4)  # skipped files may over-count: done is capped at the total
    monitor.step("tuning", 0)
    monitor.advance()
    assert events == [("encoding", 0, 5), ("encoding", 2, 5), ("encoding", 5, 5), ("tuning", 0, 0), ("tuning", 1, 0)]
    monitor.check()
    stop[0] = True
    with pytest.raises(BuildCancelled, match="build cancelled"):
        monitor.check()
    CallbackMonitor().step("x", 1)  # no callbacks: nothing to report, never cancelled
    CallbackMonitor().check()
    BuildMonitor().check()


def test_labelled_build_reports_every_step_in_order(captioned, tiny_encoder, tmp_path):
    log = ProgressLog()
    result = build_cache(config(captioned, tmp_path / "caches/c", monitor=log.monitor()), tiny_encoder)
    assert log.steps() == ["reading", "text", "encoding", "caption-keys", "tuning", "indexing", "publishing"]
    log.check_bounds()
    n = result.manifest.counts.items
    assert n == 6
    assert log.last("reading") == (6, 6)  # the images checked
    assert log.last("text") == (3, 3)  # classes
    assert log.last("encoding") == (6, 6)
    encoding = [e for e in log.events if e[0] == "encoding"]
    assert [d for _, d, _ in encoding] == [0, 2, 4, 6]  # one report per encoder batch of 2 images
    assert log.last("caption-keys") == (6, 6)
    assert log.last("tuning") == (6, 6)  # one unit per δ of the grid (captions: 6 values)
    assert log.last("indexing") == (2, 2)  # image and caption indexes
    assert log.last("publishing") == (1, 1)
    assert result.report.mode == "labelled"


def test_without_captions_there_is_no_captioning_step(captioned, tiny_encoder, tmp_path):
    log = ProgressLog()
    build_cache(config(captioned, tmp_path / "caches/c", captioner="none", monitor=log.monitor()), tiny_encoder)
    assert log.steps() == ["reading", "text", "encoding", "tuning", "indexing", "publishing"]
    assert log.last("tuning") == (1, 1) and log.last("indexing") == (1, 1)


def test_a_generative_captioner_is_a_step_of_its_own(captioned, tiny_encoder, tmp_path):
    # Its captions are made once, before encoding (and before rendering, whose prompts use them),
    # one report per batch, so a job shows where a slow captioner is.
    log = ProgressLog()
    result = build_cache(config(captioned, tmp_path / "caches/c", monitor=log.monitor(), **COCA), tiny_encoder)
    assert log.steps() == ["reading", "text", "captioning", "encoding", "caption-keys", "tuning", "indexing",
                           "publishing"]
    log.check_bounds()
    assert [(d, t) for s, d, t in log.events if s == "captioning"] == [(0, 6), (2, 6), (4, 6), (6, 6)]
    assert result.manifest.captioner.name == "coca" and "caps" in result.manifest.params.methods


@pytest.mark.parametrize("step, done, captioner", [
    ("reading", 0, {}), ("reading", 3, {}), ("text", 0, {}), ("captioning", 2, COCA), ("encoding", 2, {}),
    ("caption-keys", 0, {}), ("tuning", 1, {}), ("indexing", 1, {}),
])
def test_cancel_publishes_nothing_and_current_keeps_serving(captioned, published, tiny_encoder, tmp_path,
                                                           step, done, captioner):
    root = tmp_path / "caches"
    shutil.copytree(published, root)
    registry = CacheRegistry(root, tiny_encoder)
    assert registry.reload().loaded == {"c": "v0001"}

    log = ProgressLog(cancel_at=(step, done))
    with pytest.raises(BuildCancelled):
        build_cache(config(captioned, root / "c", monitor=log.monitor(), **captioner), tiny_encoder)
    # it stopped right there: no later step started, and a step stopped mid-way has work left
    assert log.steps()[-1] == step
    if step in ("encoding", "captioning"):
        assert log.last(step) == (2, 6)
    assert "publishing" not in log.steps()
    assert store.list_versions(root / "c") == ["v0001"] and store.current_version(root / "c") == "v0001"
    assert not list((root / "c").glob(".staging-*"))
    assert registry.reload().unchanged == ["c"] and registry.get("c").version == "v0001"
    assert store.load_cache(root / "c").version == "v0001"


def test_cancel_once_publishing_started_is_too_late(captioned, tiny_encoder, tmp_path):
    """Publishing is atomic: a cancel that arrives during it is not obeyed half-way."""
    log = ProgressLog(cancel_at=("publishing", 0))
    result = build_cache(config(captioned, tmp_path / "caches/c", monitor=log.monitor()), tiny_encoder)
    assert log.cancel_requested and result.version == "v0001"
    assert store.load_cache(tmp_path / "caches/c").version == "v0001"
