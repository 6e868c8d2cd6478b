import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kvclip import artifact as store
from kvclip.blend import DERIVED_ARRAYS, CacheTensors
from kvclip.errors import ArtifactError
from kvclip.index import build_index
from tests.manifests import sample_manifest


def make_artifact(seed: int = 0, captions: bool = True) -> store.CacheArtifact:
    rng = np.random.default_rng(seed)
    unit = lambda a, axis: (a / np.linalg.norm(a, axis=axis, keepdims=True)).astype(np.float32)  # noqa: E731
    keys = unit(rng.normal(size=(12, 8)), 1)
    caps = unit(rng.normal(size=(12, 8)), 1) if captions else None
    return store.CacheArtifact(
        labels=["a", "b", "c"],
        text_weights=unit(rng.normal(size=(8, 3)), 0),
        image_keys=keys,
        label_ids=np.arange(12) % 3,
        query_features=keys.copy(),
        caption_keys=caps,
        items=[{"path": f"/x/{i}.png", "label": "abc"[i % 3], "caption": f"caption {i}"} for i in range(12)],
        manifest=sample_manifest(name="demo", labels=["a", "b", "c"], seed=seed, params={
            "best_method": "tip", "methods": {"tip": {"alpha": 2.0, "beta": 3.0, "gamma": 0.0, "delta": 0.0}}}),
        image_index=build_index(keys),
        caption_index=build_index(caps) if captions else None,
    )


def test_publish_and_load_round_trip(tmp_path):
    cache_dir = tmp_path / "demo"
    original = make_artifact()
    assert store.publish(cache_dir, original) == "v0001"
    loaded = store.load_cache(cache_dir)
    assert loaded.version == "v0001" and loaded.labels == ["a", "b", "c"]
    for name in ("text_weights", "image_keys", "caption_keys", "label_ids", "query_features"):
        assert np.array_equal(getattr(loaded, name), getattr(original, name))
    assert loaded.items[3]["caption"] == "caption 3"
    assert loaded.image_index.ntotal == 12 and loaded.caption_index.ntotal == 12
    assert loaded.params("tip").alpha == 2.0 and loaded.best_method == "tip"
    assert loaded.methods == ["zeroshot", "tip", "tipx", "caps"]
    tensors = loaded.tensors("cpu")
    assert tensors.num_classes == 3 and torch.equal(tensors.label_ids, torch.arange(12) % 3)


def test_versions_increase_and_current_moves(tmp_path):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact(0))
    store.publish(cache_dir, make_artifact(1, captions=False), activate=False)
    assert store.list_versions(cache_dir) == ["v0001", "v0002"]
    assert store.current_version(cache_dir) == "v0001"
    store.set_current(cache_dir, "v0002")
    loaded = store.load_cache(cache_dir)
    assert loaded.version == "v0002" and loaded.caption_keys is None and "caps" not in loaded.methods
    with pytest.raises(ArtifactError, match="no complete version"):
        store.set_current(cache_dir, "v0009")


def test_corrupt_file_is_detected(tmp_path):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact())
    path = cache_dir / "versions/v0001/image_keys.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="image_keys.npy: missing or corrupt"):
        store.load_cache(cache_dir)


def test_not_a_cache_and_bad_names(tmp_path):
    with pytest.raises(ArtifactError, match="not a kvclip cache"):
        store.load_cache(tmp_path)
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ArtifactError, match="invalid cache name"):
            store.validate_cache_name(bad)


def test_exception_while_publishing_keeps_previous_version(tmp_path, monkeypatch):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact(0))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store.key_index, "write_index", explode)
    with pytest.raises(OSError, match="disk full"):
        store.publish(cache_dir, make_artifact(1))
    assert store.list_versions(cache_dir) == ["v0001"]
    assert store.load_cache(cache_dir).manifest.seed == 0
    assert not list(cache_dir.glob(".staging-*"))


def publish_and_die(cache_dir: Path, point: str) -> None:
    """In a forked child: publish the next version, dying (os._exit, no cleanup) at `point`."""
    die = lambda *a, **k: os._exit(17)  # noqa: E731
    if point == "mid-write":
        store.key_index.write_index = die  # after the arrays, before the indexes
    elif point == "before-current":
        store.set_current = die  # version renamed in, CURRENT not yet moved
    store.publish(cache_dir, make_artifact(1))
    os._exit(0)


@pytest.mark.parametrize("point", ["mid-write", "before-current"])
def test_hard_crash_while_publishing_keeps_previous_version_current(tmp_path, point):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact(0))
    # Forked, not a fresh interpreter: the crash is what the test is about, not the start.
    proc = multiprocessing.get_context("fork").Process(target=publish_and_die, args=(cache_dir, point))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 17
    if point == "mid-write":
        assert list(cache_dir.glob(".staging-*")) and store.list_versions(cache_dir) == ["v0001"]
    else:
        assert store.list_versions(cache_dir) == ["v0001", "v0002"]  # complete but not current
        assert json.loads((cache_dir / "versions/v0002/manifest.json").read_text())["seed"] == 1
    # the next build cleans the dead builder's staging folder and its never-activated version
    version = store.publish(cache_dir, make_artifact(2))
    assert store.load_cache(cache_dir).version == version == "v0002"
    assert store.load_cache(cache_dir).manifest.seed == 2
    assert store.list_versions(cache_dir) == ["v0001", "v0002"]
    assert not list(cache_dir.glob(".staging-*")) and not store.pending_versions(cache_dir)


# The typed manifest (kvclip/manifest.py) ----------------------------------------------------


def copy_v1_cache(name: str, dest):
    import shutil

    from tests.manifests import V1_CACHES

    return shutil.copytree(V1_CACHES / name, dest / name)


@pytest.mark.parametrize("name", ["pets", "pooled", "zs"])
def test_v1_caches_written_before_the_typed_manifest_still_load(name, tmp_path):
    """tests/fixtures/v1_caches: caches from the builder that wrote the manifest as a plain dict."""
    from tests.manifests import v1_manifest_json

    cache_dir = copy_v1_cache(name, tmp_path)
    raw = v1_manifest_json(name)
    loaded = store.load_cache(cache_dir)  # checksums verified
    m = loaded.manifest
    assert m.schema_version == 1 and m.name == name and m.labels == loaded.labels == raw["labels"]
    assert m.model.id == "tiny-random" and m.counts.items == loaded.num_items == raw["counts"]["items"]
    assert m.params.best_method == raw["params"]["best_method"] and m.build_report.mode == raw["build_report"]["mode"]
    assert (m.build_report.pool is not None) == (name == "pooled")
    assert m.to_json() == raw and list(m.to_json()) == list(raw)  # same keys, same order, same values
    assert loaded.key_log_partitions is None and loaded.manifest.derived_temperature is None  # computed at load
    # Re-publishing it writes the same manifest.json, plus the derived arrays (files and their
    # temperature): the typed model keeps the on-disk form.
    assert store.publish(tmp_path / "again" / name, loaded) == "v0001"
    again = json.loads((tmp_path / "again" / name / "versions/v0001/manifest.json").read_text())
    derived = set()
    if loaded.num_items:  # a zero-shot cache has none: nothing to compute
        assert again.pop("derived_temperature") == raw["temperature"]
        derived = {f"{a}.npy" for a in DERIVED_ARRAYS if a != "class_caption_sums" or loaded.caption_keys is not None}
    assert set(again["files"]) - set(raw["files"]) == derived
    again["files"] = {k: v for k, v in again["files"].items() if k not in derived}
    assert again == raw


def test_v1_manifest_fields_read_typed(tmp_path):
    loaded = store.load_cache(copy_v1_cache("pets", tmp_path))
    tuned = loaded.manifest.params.methods["tipx"]
    assert loaded.params("tipx").gamma == tuned.gamma == 10.0 and loaded.best_method == "tipx"
    assert loaded.temperature == loaded.manifest.temperature == 0.5
    assert loaded.manifest.captioner.name == "sidecar" and loaded.manifest.prompts.descriptions is None
    report = loaded.manifest.build_report
    assert report.skipped_count == 1 and report.skipped[0].path.endswith("broken.png")
    assert loaded.manifest.faiss.methods["tip"].top1_agreement == 1.0
    assert loaded.manifest.tuning.grid is not None and 1000.0 in loaded.manifest.tuning.grid.alphas


def _rewrite_manifest(cache_dir, change) -> None:
    """Edit manifest.json in place (it is not among the checksummed files)."""
    path = cache_dir / "versions/v0001/manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_unknown_manifest_keys_load_and_are_kept(tmp_path):
    """Forward compatibility: a newer builder's extra keys neither break loading nor get lost."""
    cache_dir = copy_v1_cache("pets", tmp_path)

    def add(data):
        data["future_report"] = {"x": 1}
        data["build_report"]["gpu"] = "H200"
        data["params"]["methods"]["tip"]["epsilon"] = 0.5

    _rewrite_manifest(cache_dir, add)
    loaded = store.load_cache(cache_dir)
    assert loaded.manifest.model_extra == {"future_report": {"x": 1}}
    assert loaded.manifest.build_report.model_extra == {"gpu": "H200"}
    assert loaded.params("tip").alpha == loaded.manifest.params.methods["tip"].alpha  # unknown parameter ignored
    out = loaded.manifest.to_json()
    assert out["future_report"] == {"x": 1} and out["build_report"]["gpu"] == "H200"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema_version=2), "schema version 2 is not 1"),
    (lambda d: d.pop("labels"), "not a valid cache manifest"),
    (lambda d: d["counts"].update(items="many"), "not a valid cache manifest"),
    (lambda d: d["build_report"].update(mode="magic"), "not a valid cache manifest"),
])
def test_a_manifest_that_is_not_v1_is_refused(tmp_path, change, message):
    cache_dir = copy_v1_cache("zs", tmp_path)
    _rewrite_manifest(cache_dir, change)
    with pytest.raises(ArtifactError, match=message):
        store.load_cache(cache_dir)


def test_serving_loads_only_what_it_reads_memory_mapped(tmp_path):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact())
    served = store.load_cache(cache_dir, arrays=store.SERVING_ARRAYS, mmap=True, index_min_items=12)
    assert served.query_features is None  # the tuner's, never read by a server
    assert served.image_index is None and served.caption_index is None  # 12 items: blended densely
    assert not served.image_keys.flags.writeable and isinstance(served.image_keys, np.memmap)
    tensors = served.tensors("cpu")
    assert tensors.image_keys.data_ptr() == served.image_keys.ctypes.data  # shared, not copied
    assert np.array_equal(served.image_keys, store.load_cache(cache_dir).image_keys)
    large = store.load_cache(cache_dir, arrays=store.SERVING_ARRAYS, mmap=True, index_min_items=11)
    assert large.image_index.ntotal == 12  # above the dense limit a server searches the index


# The derived serving arrays (key log-partitions, per-class sums) -----------------------------

TENSOR_FIELDS = ("text_weights", "image_keys", "caption_keys", "label_ids", "key_log_partitions", "class_counts",
                 "class_image_sums", "class_caption_sums", "class_log_partition_sums")


def fresh_tensors(artifact: store.CacheArtifact, temperature: float) -> CacheTensors:
    caps = None if artifact.caption_keys is None else torch.from_numpy(np.asarray(artifact.caption_keys))
    return CacheTensors.build(torch.from_numpy(np.asarray(artifact.text_weights)),
                              torch.from_numpy(np.asarray(artifact.image_keys)),
                              torch.from_numpy(np.asarray(artifact.label_ids)), caps, temperature=temperature)


def assert_same_tensors(got: CacheTensors, want: CacheTensors) -> None:
    for name in TENSOR_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        assert a is None or (a.dtype == b.dtype and torch.equal(a, b)), name  # bit for bit
    assert got.temperature == want.temperature


def no_computing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("computed the derived arrays instead of reading them")
    from kvclip import blend
    monkeypatch.setattr(blend, "key_log_partitions", refuse)
    monkeypatch.setattr(blend, "class_key_sums", refuse)


def derived_files(captions: bool) -> set[str]:
    return {f"{a}.npy" for a in DERIVED_ARRAYS if captions or a != "class_caption_sums"}


@pytest.mark.parametrize("captions", [True, False])
def test_a_published_version_carries_the_derived_arrays_and_loading_reads_them(tmp_path, monkeypatch, captions):
    cache_dir = tmp_path / "demo"
    original = make_artifact(captions=captions)
    store.publish(cache_dir, original)
    want = fresh_tensors(original, original.temperature)
    manifest = store.read_manifest(cache_dir / "versions/v0001")
    assert derived_files(captions) <= set(manifest.files) and ("class_caption_sums.npy" in manifest.files) == captions
    assert manifest.derived_temperature == manifest.temperature == original.temperature
    served = store.load_cache(cache_dir, arrays=store.SERVING_ARRAYS, mmap=True)
    assert isinstance(served.key_log_partitions, np.memmap)
    no_computing(monkeypatch)
    got = served.tensors("cpu")
    assert got.key_log_partitions.data_ptr() == served.key_log_partitions.ctypes.data  # the file's pages
    assert_same_tensors(got, want)


@pytest.mark.parametrize("captions", [True, False])
def test_a_version_without_the_derived_arrays_computes_them(tmp_path, captions):
    cache_dir = tmp_path / "demo"
    original = make_artifact(captions=captions)
    store.publish(cache_dir, original)

    def drop(data):
        del data["derived_temperature"]
        for name in derived_files(captions):
            del data["files"][name]  # KeyError if publish did not write it
            (cache_dir / "versions/v0001" / name).unlink()
    _rewrite_manifest(cache_dir, drop)
    served = store.load_cache(cache_dir, arrays=store.SERVING_ARRAYS, mmap=True)
    assert served.key_log_partitions is None and served.manifest.derived_temperature is None
    assert_same_tensors(served.tensors("cpu"), fresh_tensors(original, original.temperature))


def test_derived_arrays_of_another_temperature_are_computed_again(tmp_path, monkeypatch):
    cache_dir = tmp_path / "demo"
    original = make_artifact()
    store.publish(cache_dir, original)
    _rewrite_manifest(cache_dir, lambda d: d.update(temperature=0.25))  # the stored ones are at 0.5
    served = store.load_cache(cache_dir, arrays=store.SERVING_ARRAYS, mmap=True)
    assert served.key_log_partitions is not None and served.manifest.derived_temperature == 0.5
    got = served.tensors("cpu")
    assert_same_tensors(got, fresh_tensors(original, 0.25))
    assert not torch.equal(got.key_log_partitions, torch.from_numpy(np.asarray(served.key_log_partitions)))


@pytest.mark.parametrize("name", ["key_log_partitions", "class_caption_sums"])
def test_a_corrupt_derived_array_is_detected(tmp_path, name):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact())
    path = cache_dir / f"versions/v0001/{name}.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{name}.npy: missing or corrupt"):
        store.load_cache(cache_dir, arrays=store.SERVING_ARRAYS, mmap=True)


def test_precomputed_arrays_of_the_wrong_shape_are_refused():
    artifact = make_artifact()
    good = fresh_tensors(artifact, 0.5)
    derived = {name: getattr(good, name) for name in DERIVED_ARRAYS}
    args = [torch.from_numpy(getattr(artifact, a)) for a in ("text_weights", "image_keys", "label_ids", "caption_keys")]
    assert_same_tensors(CacheTensors.build(*args, derived=derived), good)
    with pytest.raises(ValueError, match="precomputed class_image_sums is"):
        CacheTensors.build(*args, derived={**derived, "class_image_sums": good.class_image_sums[:2]})
    with pytest.raises(ValueError, match="precomputed class_caption_sums missing"):
        CacheTensors.build(*args, derived={k: v for k, v in derived.items() if k != "class_caption_sums"})


@pytest.mark.parametrize("stored", [True, False], ids=["derived-read", "derived-computed"])
def test_float16_tensors_cast_only_the_keys_and_derive_from_float32(tmp_path, monkeypatch, stored):
    """A GPU server's keys (--key-precision): the key matrices in float16, every other tensor, the
    derived terms included, bit for bit the float32 ones, whether read from the version or computed."""
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact())
    served = store.load_cache(cache_dir, arrays=store.SERVING_ARRAYS, mmap=True)
    want = served.tensors("cpu")
    if stored:
        no_computing(monkeypatch)
    else:
        for name in DERIVED_ARRAYS:
            setattr(served, name, None)
    got = served.tensors("cpu", key_dtype=torch.float16)
    assert got.key_dtype == torch.float16 and got.image_keys.nbytes * 2 == want.image_keys.nbytes
    for name in TENSOR_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        if name in ("image_keys", "caption_keys"):
            assert a.dtype == torch.float16 and torch.equal(a, b.half()), name
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), name
