"""The Python client and the `kvclip` client commands against a real server over HTTP (the
server's app under uvicorn in a thread of the test process: these tests are about the client,
the server's own process is tested in test_service_uvicorn.py).

One server (tiny random model, API keys on) serves the whole module; it gets its own copy
of the session's caches, because some tests activate and delete versions. Accuracy is
meaningless with random weights: these tests check behaviour (order, types, errors, auth,
agreement between input kinds and between the sync and async clients).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kvclip.clients import ApiError, AsyncKvclipClient, Job, KvclipClient, ServerUnreachable
from tests.client_fakes import run_cli
from tests.live_server import serve_in_thread
from tests.server_process import base_env, free_port, kvclip_cmd
from tests.service_helpers import copy_caches

READ_KEY, ADMIN_KEY = "reader", "boss"


@pytest.fixture(scope="module")
def server(served_caches, tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("client")
    caches = copy_caches(served_caches, root / "caches")
    with serve_in_thread(caches, root, keys={READ_KEY: "read", ADMIN_KEY: "admin"}, encoder=tiny_encoder) as srv:
        yield srv


@pytest.fixture
def reader(server):
    with KvclipClient(server.url, api_key=READ_KEY, backoff=0.05, timeout=30) as client:
        yield client


@pytest.fixture
def admin(server):
    with KvclipClient(server.url, api_key=ADMIN_KEY, backoff=0.05, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def images(fashion_test) -> list[Path]:
    return sorted(fashion_test.rglob("*.png"), key=lambda p: p.name)[:4]


def assert_same_scores(a, b) -> None:
    assert len(a.results) == len(b.results)
    for x, y in zip(a.results, b.results):
        assert [s.label for s in x.labels] == [s.label for s in y.labels]
        assert [s.score for s in x.labels] == pytest.approx([s.score for s in y.labels], abs=1e-5)


# --- classify -------------------------------------------------------------------------------

def test_paths_bytes_pil_numpy_and_files_classify_the_same(reader, images):
    by_path = reader.classify(images, "fashion", top_k=3)
    assert [r.name for r in by_path.results] == [p.name for p in images]
    arrays = [np.asarray(Image.open(p)) for p in images]
    handles = [open(p, "rb") for p in images]
    try:
        for other in ([p.read_bytes() for p in images], [Image.open(p) for p in images], arrays,
                      [a.astype(np.float32) / 255 for a in arrays], handles, [str(p) for p in images]):
            assert_same_scores(by_path, reader.classify(other, "fashion", top_k=3))
    finally:
        for handle in handles:
            handle.close()
    single = reader.classify(images[0], "fashion", top_k=3)  # one image, not in a list
    assert len(single.results) == 1
    assert_same_scores(single, reader.classify([arrays[0]], "fashion", top_k=3))


def test_typed_results_in_request_order(reader, images):
    forward = reader.classify(images, "fashion", top_k=3)
    backward = reader.classify(images[::-1], "fashion", top_k=3)
    assert [r.index for r in backward.results] == [0, 1, 2, 3]
    assert [r.name for r in backward.results] == [p.name for p in images[::-1]]
    assert_same_scores(forward, dataclasses.replace(backward, results=backward.results[::-1]))
    assert forward.cache == "fashion" and forward.model == "tiny-random" and forward.version.startswith("v")
    assert forward.method in ("zeroshot", "tip", "tipx")  # auto resolved to the tuned method
    for result in forward.results:
        assert result.ok and result.error is None and result.neighbors is None and len(result.labels) == 3
        scores = [s.score for s in result.labels]
        assert scores == sorted(scores, reverse=True) and result.top == result.labels[0]
        assert isinstance(result.top.logit, float) and 0 <= result.top.score <= 1


def test_explain_method_and_partial(reader, images):
    result = reader.classify(images[:2], "fashion-caps", top_k=2, method="caps", explain=True)
    assert result.method == "caps"
    neighbors = result.results[0].neighbors
    assert neighbors and neighbors[0].caption == f"a photo of a {neighbors[0].label}"
    assert neighbors[0].name.endswith(".png") and isinstance(neighbors[0].item, int)
    with pytest.raises(ApiError) as info:
        reader.classify([images[0], b"not an image"], "fashion")
    assert info.value.status == 400 and info.value.code == "bad_image"
    assert info.value.details[0]["index"] == 1
    partial = reader.classify([images[0], b"not an image"], "fashion", partial=True)
    assert partial.results[0].ok and partial.results[1].error.code == "bad_image"
    assert partial.results[1].top is None


def test_server_errors_become_api_errors(reader, images):
    with pytest.raises(ApiError) as info:
        reader.classify(images[0], "no-such-cache")
    assert (info.value.status, info.value.code) == (404, "unknown_cache") and "no-such-cache" in info.value.message
    assert info.value.request_id
    with pytest.raises(ApiError) as info:
        reader.cache("no-such-cache")
    assert (info.value.status, info.value.code) == (404, "unknown_cache")
    with pytest.raises(ApiError) as info:
        reader.classify(images[0], "fashion", top_k=0)
    assert (info.value.status, info.value.code) == (422, "invalid_parameters")


def test_api_keys(server, reader):
    with KvclipClient(server.url, api_key="", retries=0) as anonymous, pytest.raises(ApiError) as info:
        anonymous.caches()
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    with pytest.raises(ApiError) as info:
        reader.activate("fashion", "v0002")
    assert (info.value.status, info.value.code) == (403, "forbidden") and "admin" in info.value.message
    assert [c.name for c in reader.caches()] == ["fashion", "fashion-caps"]


def test_probes(reader):
    assert reader.health() is True
    readiness = reader.ready()
    assert readiness.ready and readiness.model == "tiny-random" and readiness.device == "cpu"
    assert readiness.caches["fashion-caps"] == "v0001" and readiness.errors == {}


def test_unreachable_server_is_one_clear_error():
    with KvclipClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as client:
        with pytest.raises(ServerUnreachable, match="connection refused"):
            client.caches()


@pytest.mark.anyio
async def test_async_client_matches_the_sync_client(server, reader, images):
    sync = reader.classify(images, "fashion", top_k=4, explain=True)
    async with AsyncKvclipClient(server.url, api_key=READ_KEY) as client:
        result = await client.classify(images, "fashion", top_k=4, explain=True)
        infos, detail, ready = await client.caches(), await client.cache("fashion"), await client.ready()
        with pytest.raises(ApiError) as info:
            await client.classify(images, "nope")
    assert_same_scores(sync, result)
    assert [r.neighbors for r in result.results] == [r.neighbors for r in sync.results]
    assert infos == reader.caches() and detail == reader.cache("fashion") and ready == reader.ready()
    assert info.value.code == "unknown_cache"


def test_cache_management(admin, reader):
    detail = admin.cache("fashion")
    assert detail.labels and detail.versions == ["v0001", "v0002"] and detail.current_version == "v0001"
    assert detail.classes == len(detail.labels) and detail.params and detail.report is not None
    assert reader.caches()[0].labels is None  # the list carries summaries only
    assert admin.activate("fashion", "v0002").version == "v0002"
    assert reader.cache("fashion").current_version == "v0002"
    admin.activate("fashion", "v0001")
    with pytest.raises(ApiError) as info:
        admin.activate("fashion", "v0042")
    assert (info.value.status, info.value.code) == (404, "unknown_version")
    with pytest.raises(ApiError) as info:
        admin.delete_version("fashion", "v0001")
    assert (info.value.status, info.value.code) == (409, "version_in_use")
    assert admin.delete_version("fashion", "v0002") is None
    assert admin.cache("fashion").versions == ["v0001"]
    with pytest.raises(ApiError) as info:
        admin.delete_version("fashion", "v0002")
    assert info.value.status == 404
    report = admin.reload()
    assert sorted(report.unchanged) == ["fashion", "fashion-caps"] and report.failed == {}


# --- the command line -----------------------------------------------------------------------

def test_more_images_than_the_server_takes_in_one_request(reader, fashion_test):
    many = sorted(fashion_test.rglob("*.png"), key=lambda p: p.name)[:70]  # server --max-images: 64
    with pytest.raises(ApiError) as info:
        reader.classify(many, "fashion", top_k=2, chunk_size=70)
    assert info.value.status == 413 and info.value.code == "too_many_images"
    result = reader.classify(many, "fashion", top_k=2)  # default chunks of 64
    assert [r.index for r in result.results] == list(range(70))
    assert [r.name for r in result.results] == [p.name for p in many]
    assert_same_scores(dataclasses.replace(result, results=result.results[62:66]),
                       reader.classify(many[62:66], "fashion", top_k=2))


def test_cli_classify_table_and_json(server, images, capsys, monkeypatch):
    monkeypatch.setenv("KVCLIP_API_KEY", READ_KEY)
    with KvclipClient(server.url, api_key=READ_KEY) as client:
        expected = client.classify(images[:2], "fashion", top_k=2)
    code, out, err = run_cli(capsys, "classify", *map(str, images[:2]), "--server", server.url,
                             "--cache", "fashion", "--top-k", "2")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("cache fashion v0001, method ") and lines[1].split() == ["image", "rank", "label", "score"]
    assert images[0].name in out and expected.results[0].top.label in out
    assert lines[2].split()[:2] == [images[0].name, "1"]

    monkeypatch.setenv("KVCLIP_SERVER", server.url)  # the default --server
    code, out, _ = run_cli(capsys, "classify", *map(str, images[:2]), "--cache", "fashion", "--top-k", "2",
                           "--json", "--explain")
    body = json.loads(out)
    assert code == 0 and [r["name"] for r in body["results"]] == [p.name for p in images[:2]]
    code, out, _ = run_cli(capsys, "classify", *map(str, images[:2]), "--cache", "fashion", "--top-k", "2",
                           "--json", "--chunk-size", "1")  # one request per image, one answer
    assert code == 0 and [r["index"] for r in json.loads(out)["results"]] == [0, 1]
    assert body["results"][0]["labels"][0]["label"] == expected.results[0].top.label
    assert body["results"][0]["neighbors"]


def test_cli_errors_are_one_line(server, images, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KVCLIP_API_KEY", READ_KEY)
    code, out, err = run_cli(capsys, "classify", str(images[0]), "--server", server.url, "--cache", "nope")
    assert code != 0 and out == ""
    assert len(err.splitlines()) == 1
    assert re.fullmatch(r"kvclip: error: unknown cache 'nope'.* \(HTTP 404 unknown_cache\)\n", err)

    code, _, err = run_cli(capsys, "caches", "activate", "fashion", "v0002", "--server", server.url)
    assert code != 0 and err.splitlines() == ["kvclip: error: the API key lacks the 'admin' scope (HTTP 403 forbidden)"]

    code, _, err = run_cli(capsys, "caches", "list", "--server", f"http://127.0.0.1:{free_port()}", "--retries", "0")
    assert code != 0 and len(err.splitlines()) == 1
    assert err.startswith("kvclip: error: cannot reach the kvclip server at http://127.0.0.1:") and "refused" in err

    code, _, err = run_cli(capsys, "classify", str(tmp_path / "missing.png"), "--server", server.url, "--cache", "fashion")
    assert code != 0 and err.startswith("kvclip: error: cannot read image") and len(err.splitlines()) == 1


def test_cli_caches_commands(server, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("KVCLIP_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(f"{ADMIN_KEY}\n")
    common = ("--server", server.url, "--api-key-file", str(key_file))
    code, out, _ = run_cli(capsys, "caches", "list", *common)
    assert code == 0 and out.split("\n")[0].split()[:3] == ["cache", "version", "best"]
    assert "fashion-caps" in out
    code, out, _ = run_cli(capsys, "caches", "list", "--json", *common)
    assert [c["name"] for c in json.loads(out)] == ["fashion", "fashion-caps"]
    code, out, _ = run_cli(capsys, "caches", "show", "fashion", *common)
    assert code == 0 and "v0001 (served, CURRENT)" in out and "sneaker" in out
    code, out, _ = run_cli(capsys, "caches", "reload", *common)
    assert code == 0 and "unchanged  2 cache(s)" in out
    code, _, err = run_cli(capsys, "caches", "list", "--server", server.url)  # no key at all
    assert code != 0 and "(HTTP 401 unauthorized)" in err


@pytest.mark.parametrize("command", [("caches", "list"), ("caches", "show", "fashion"), ("classify", "--cache", "fashion")])
def test_cli_piped_into_a_reader_that_quits_exits_quietly(server, images, command):
    """`kvclip caches list | head -1`: the reader is gone before kvclip writes; no traceback."""
    argv = [*command, *(str(p) for p in images[:2] if command[0] == "classify"), "--server", server.url]
    proc = subprocess.Popen(kvclip_cmd(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=base_env(KVCLIP_API_KEY=READ_KEY))
    proc.stdout.close()  # like head after its first line, before anything was written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGPIPE, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


# --- builds ---------------------------------------------------------------------------------

@pytest.fixture
def new_cache(server, admin):
    """A name for a cache the test builds; removed afterwards (the others list two caches)."""
    yield "mini"
    shutil.rmtree(server.caches / "mini", ignore_errors=True)
    assert admin.reload().removed == ["mini"]


def test_build_cache_from_a_folder_then_classify(admin, reader, fashion_train, images, tmp_path, new_cache):
    data = tmp_path / "data"
    for label in ("sneaker", "trouser", "bag"):
        shutil.copytree(fashion_train / label, data / label)
        for extra in sorted((data / label).glob("*.png"))[3:]:
            extra.unlink()
    for image in data.rglob("*.png"):
        image.with_suffix(".txt").write_text(f"a photo of a {image.parent.name}")
    seen: list[Job] = []
    job = admin.build_cache("mini", data=data, shots=3, views=2, captioner="sidecar",
                            progress=seen.append, poll_interval=0.2)
    assert job.succeeded and job.version == "v0001" and job.activated and job.cache == "mini"
    assert job.error is None and job.finished_at and seen[-1] == job and len(seen) >= 2
    assert job.options["shots"] == 3 and job.options["captioner"] == "sidecar"
    info = reader.cache("mini")
    assert sorted(info.labels) == ["bag", "sneaker", "trouser"] and info.items == 9 and info.captions
    result = reader.classify(images, "mini", top_k=3, method="caps", explain=True)
    assert result.version == "v0001" and {s.label for r in result.results for s in r.labels} <= set(info.labels)
    assert result.results[0].neighbors[0].caption.startswith("a photo of a ")
    assert [j.id for j in reader.jobs() if j.id == job.id] == [job.id]
    assert reader.job(job.id).state == "succeeded"


def test_cli_build_refusals_are_one_line(server, capsys, monkeypatch, tmp_path):
    # Refused before any build starts; the build-and-follow path is in test_client_unit.py.
    monkeypatch.setenv("KVCLIP_API_KEY", ADMIN_KEY)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    code, _, err = run_cli(capsys, "caches", "build", "pets-zs", "--server", server.url)
    assert code != 0 and err.splitlines() == [
        "kvclip: error: caches build needs --data DIR (or an archive), --remote-data DIR or --labels FILE"]
    code, _, err = run_cli(capsys, "caches", "build", "pets-zs", "--labels", str(labels), "--remote-data", "/etc",
                           "--server", server.url)
    assert code != 0 and len(err.splitlines()) == 1 and err.endswith("(HTTP 403 forbidden)\n")
    code, _, err = run_cli(capsys, "caches", "build", "pets-zs", "--labels", str(labels), "--shots", "0",
                           "--server", server.url)
    assert code != 0 and len(err.splitlines()) == 1 and err.endswith("(HTTP 422 invalid_parameters)\n")
