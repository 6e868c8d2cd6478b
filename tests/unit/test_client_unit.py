"""The Python client without a server: retries, errors, image encoding, and build_cache's
upload-and-poll logic against a fake transport (httpx.MockTransport).

The real server is exercised in tests/e2e/test_client_server.py; here the transport answers
what a test needs (a 503 then a 200, a job that fails) so each client rule is checked alone.
"""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from kvclip.clients import (
    ApiError,
    AsyncKvclipClient,
    InputError,
    JobFailed,
    KvclipClient,
    KvclipClientError,
    ServerUnreachable,
)
from kvclip.clients.http import parse_retry_after
from kvclip.clients.images import image_file, image_files
from kvclip.clients.models import Job
from kvclip.clients.progress import JobProgress
from tests.client_fakes import URL, Recorder, build_script, error, job_json, make_client, multipart, png_bytes

CLASSIFY_BODY = {
    "cache": "pets", "version": "v0002", "method": "tip", "model": "tiny-random",
    "results": [
        {"index": 0, "name": "a.png", "labels": [{"label": "cat", "score": 0.7, "logit": 3.0},
                                                 {"label": "dog", "score": 0.3, "logit": 2.0}],
         "neighbors": [{"item": 4, "label": "cat", "caption": None, "name": "c.png", "affinity": 0.9}],
         "error": None},
        {"index": 1, "name": "b.png", "labels": [], "neighbors": None,
         "error": {"code": "bad_image", "message": "not an image"}},
    ],
}
CACHE = {"name": "pets", "version": "v0001", "model": "tiny-random", "classes": 2, "items": 4,
         "methods": ["zeroshot", "tip"], "best_method": "tip", "captions": False}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# --- retries and errors -------------------------------------------------------------------

def test_503_then_200_retries_and_honours_retry_after():
    handler = Recorder(error(503, "overloaded", "queue full", {"Retry-After": "2"}), httpx.Response(200, json=[CACHE]))
    client, sleeps = make_client(handler)
    infos = client.caches()
    assert [c.name for c in infos] == ["pets"] and len(handler.requests) == 2
    assert sleeps == [2.0]  # the server's Retry-After, not the client's backoff


def test_503_backoff_doubles_then_gives_up_with_the_server_error():
    handler = Recorder(error(503, "not_ready", "server not ready: loading"))
    client, sleeps = make_client(handler, retries=3, backoff=0.1)
    with pytest.raises(ApiError) as info:
        client.caches()
    assert info.value.status == 503 and info.value.code == "not_ready"
    assert len(handler.requests) == 4 and sleeps == pytest.approx([0.1, 0.2, 0.4])


def test_422_is_not_retried_and_carries_code_message_details():
    details = [{"field": "top_k", "message": "must be >= 1"}]
    handler = Recorder(error(422, "invalid_parameters", "invalid parameters: top_k", details=details))
    client, sleeps = make_client(handler)
    with pytest.raises(ApiError) as info:
        client.classify(b"\x89PNG\r\n\x1a\n...", "pets", top_k=0)
    exc = info.value
    assert len(handler.requests) == 1 and sleeps == []
    assert (exc.status, exc.code, exc.message, exc.details) == (422, "invalid_parameters",
                                                                "invalid parameters: top_k", details)
    assert str(exc) == "invalid parameters: top_k (HTTP 422 invalid_parameters)"


def test_404_not_retried():
    handler = Recorder(error(404, "unknown_cache", "unknown cache 'nope'"))
    client, sleeps = make_client(handler)
    with pytest.raises(ApiError, match=r"unknown cache 'nope' \(HTTP 404 unknown_cache\)"):
        client.cache("nope")
    assert len(handler.requests) == 1 and sleeps == []


def test_connection_refused_retried_then_one_clear_error():
    handler = Recorder(httpx.ConnectError("[Errno 111] Connection refused"))
    client, sleeps = make_client(handler, retries=2)
    with pytest.raises(ServerUnreachable, match="cannot reach the kvclip server at http://kvclip.test: connection refused"):
        client.caches()
    assert len(handler.requests) == 3 and sleeps == pytest.approx([0.1, 0.2])


def test_timeout_then_success_for_idempotent_calls():
    handler = Recorder(httpx.ReadTimeout("slow"), httpx.Response(200, json=CLASSIFY_BODY))
    client, _ = make_client(handler)
    assert client.classify(b"x", "pets").version == "v0002" and len(handler.requests) == 2


def test_build_upload_not_resent_after_a_timeout_but_after_a_refused_connection(tmp_path):
    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)
    (data / "a.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    handler = Recorder(httpx.ReadTimeout("slow"))
    client, _ = make_client(handler)
    with pytest.raises(ServerUnreachable, match="timed out"):
        client.build_cache("pets", data=tmp_path / "data", wait=False)
    assert len(handler.requests) == 1  # the server may have started the build: never twice

    handler = Recorder(httpx.ConnectError("refused"), error(503, "not_ready", "loading"),
                       httpx.Response(202, json=job_json("queued")))
    client, _ = make_client(handler)
    assert client.build_cache("pets", data=tmp_path / "data", wait=False).state == "queued"
    assert len(handler.requests) == 3
    assert multipart(handler.requests[1]) == multipart(handler.requests[2])  # the zip was rewound for the retry
    _, files = multipart(handler.requests[2])
    assert zipfile.ZipFile(io.BytesIO(files[0][2])).namelist() == ["cat/a.png"]


def test_non_json_error_body():
    handler = Recorder(httpx.Response(502, text="<html><body>Bad gateway</body></html>"))
    client, _ = make_client(handler)
    with pytest.raises(ApiError) as info:
        client.caches()
    assert info.value.status == 502 and info.value.code == "http_error" and "Bad gateway" in info.value.message


def test_retry_after_forms():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait


def test_api_key_header_from_argument_or_environment(monkeypatch):
    handler = Recorder(httpx.Response(200, json=[]))
    monkeypatch.delenv("KVCLIP_API_KEY", raising=False)
    make_client(handler)[0].caches()
    make_client(handler, api_key="k1")[0].caches()
    monkeypatch.setenv("KVCLIP_API_KEY", "k2")
    make_client(handler)[0].caches()
    make_client(handler, api_key="k3")[0].caches()  # the argument wins
    assert [r.headers.get("authorization") for r in handler.requests] == [None, "Bearer k1", "Bearer k2", "Bearer k3"]


def test_base_url_from_environment(monkeypatch):
    monkeypatch.setenv("KVCLIP_SERVER", "http://example.invalid:9/")
    assert KvclipClient().base_url == "http://example.invalid:9"
    monkeypatch.delenv("KVCLIP_SERVER")
    assert KvclipClient().base_url == "http://127.0.0.1:8000"


def test_health_and_ready():
    handler = Recorder(httpx.Response(200, json={"status": "ok"}),
                       httpx.Response(503, json={"ready": False, "model": None, "device": None, "caches": {},
                                                 "errors": {"model": "loading"}}, headers={"Retry-After": "1"}))
    client, sleeps = make_client(handler)
    assert client.health() is True
    readiness = client.ready()
    assert readiness.ready is False and readiness.errors == {"model": "loading"} and sleeps == []  # an answer
    client, _ = make_client(Recorder(error(503, "unavailable", "busy")), retries=0)
    assert client.health() is False


# --- classify: request and typed result ---------------------------------------------------

def test_classify_request_and_typed_result():
    handler = Recorder(httpx.Response(200, json=CLASSIFY_BODY))
    client, _ = make_client(handler)
    image = png_bytes(np.zeros((8, 8), np.uint8))
    result = client.classify([image, io.BytesIO(b"junk")], "pets", top_k=2, method="tip", explain=True, partial=True)
    request = handler.requests[0]
    assert request.url.path == "/v1/classify"
    assert dict(request.url.params) == {"cache": "pets", "top_k": "2", "method": "tip", "explain": "true",
                                        "partial": "true"}
    _, files = multipart(request)
    assert [(f, n) for f, n, _ in files] == [("file", "image[0]"), ("file", "image[1]")]
    assert files[0][2] == image
    assert (result.cache, result.version, result.method, result.model) == ("pets", "v0002", "tip", "tiny-random")
    first, second = result.results
    assert first.top.label == "cat" and first.top.score == 0.7 and first.top.logit == 3.0 and first.ok
    assert first.neighbors[0].item == 4 and first.neighbors[0].name == "c.png" and first.neighbors[0].caption is None
    assert second.top is None and not second.ok and second.error.code == "bad_image"


def test_classify_defaults_send_no_optional_parameters():
    handler = Recorder(httpx.Response(200, json=CLASSIFY_BODY))
    make_client(handler)[0].classify(b"x", "pets")
    assert dict(handler.requests[0].url.params) == {"cache": "pets"}


class ChunkServer:
    """Answers each classify request like the server would: one result per file part, named
    after it, from the cache version `versions` gives for the n-th request."""

    def __init__(self, *versions: str) -> None:
        self.versions, self.requests = list(versions), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        _, files = multipart(request)
        version = self.versions[min(len(self.requests), len(self.versions)) - 1]
        results = [{"index": i, "name": name, "labels": [{"label": "cat", "score": 1.0, "logit": 1.0}],
                    "neighbors": None, "error": None} for i, (_, name, _) in enumerate(files)]
        return httpx.Response(200, json={**CLASSIFY_BODY, "version": version, "results": results})


def test_classify_splits_long_lists_into_chunks_and_keeps_order():
    server = ChunkServer("v0002")
    client, _ = make_client(server)
    result = client.classify([b"x"] * 7, "pets", chunk_size=3)
    assert [len(multipart(r)[1]) for r in server.requests] == [3, 3, 1]
    assert [(r.index, r.name) for r in result.results] == [(i, f"image[{i}]") for i in range(7)]
    assert result.version == "v0002"
    with pytest.raises(InputError, match="chunk_size"):
        client.classify([b"x"], "pets", chunk_size=0)


def test_classify_resends_the_list_when_the_version_changes_between_chunks():
    server = ChunkServer("v0001", "v0002", "v0002", "v0002")
    client, _ = make_client(server)
    result = client.classify([b"x"] * 4, "pets", chunk_size=2)
    assert len(server.requests) == 4 and result.version == "v0002" and len(result.results) == 4
    flapping = ChunkServer("v0001", "v0002", "v0001", "v0002")
    client, _ = make_client(flapping)
    with pytest.raises(KvclipClientError, match="changed version"):
        client.classify([b"x"] * 4, "pets", chunk_size=2)


def test_a_chunk_error_names_images_by_their_place_in_the_whole_list():
    details = [{"index": 1, "name": "image[3]", "message": "not an image"}]
    handler = Recorder(httpx.Response(200, json=CLASSIFY_BODY),
                       error(400, "bad_image", "1 of 2 images could not be decoded", details=details))
    client, _ = make_client(handler)
    with pytest.raises(ApiError) as info:
        client.classify([b"x"] * 4, "pets", chunk_size=2)
    assert info.value.status == 400 and info.value.details[0]["index"] == 3
    assert "images 2+" in info.value.message


# --- images ---------------------------------------------------------------------------------

def test_image_inputs_encode_to_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = tmp_path / "grey.png"
    path.write_bytes(png_bytes(grey))
    for source in (path, str(path), path.read_bytes(), Image.open(path), grey, grey[:, :, None]):
        assert np.array_equal(pixels(image_file(source).data), grey), type(source)
    assert np.array_equal(pixels(image_file(rgb).data), rgb)
    assert np.array_equal(pixels(image_file(Image.fromarray(rgb)).data), rgb)
    floats = grey.astype(np.float32) / 255
    assert np.array_equal(pixels(image_file(floats).data), grey)
    assert np.array_equal(pixels(image_file(grey.astype(np.int64)).data), grey)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert pixels(image_file(cmyk).data).shape == (12, 10, 3)


def test_image_names_and_types(tmp_path):
    path = tmp_path / "cat.jpg"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with open(path, "rb") as handle:
        files = image_files([path, path.read_bytes(), handle, np.zeros((4, 4), np.uint8)])
    assert [f.name for f in files] == ["cat.jpg", "image[1]", "cat.jpg", "image[3]"]
    assert [f.content_type for f in files] == ["image/jpeg", "image/jpeg", "image/jpeg", "image/png"]
    assert image_file(b"not an image").content_type == "application/octet-stream"  # the server says why
    assert len(image_files(path)) == 1 and len(image_files((path, path))) == 2


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4, 2), np.uint8), "HxW"),
    (np.full((4, 4), 1.5), r"\[0, 1\]"),
    (np.full((4, 4), 300), "0..255"),
    (np.zeros((4, 4), np.complex64), "dtype"),
    ("missing.png", "cannot read image missing.png"),
    (12, "cannot send a int"),
    (io.StringIO("text"), "binary mode"),
    (b"", "empty"),
    ([], "no images"),
])
def test_bad_image_inputs(bad, message):
    with pytest.raises(InputError, match=message):
        image_files(bad)


# --- build_cache: upload, poll, finish ----------------------------------------------------

def make_data(root: Path, labels=("cat", "dog"), per_label: int = 2) -> Path:
    for label in labels:
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            (root / label / f"{i}.png").write_bytes(png_bytes(np.full((4, 4), i, np.uint8)))
            (root / label / f"{i}.txt").write_text(f"a {label}")
    (root / ".DS_Store").write_bytes(b"junk")
    return root


def test_build_cache_uploads_a_zipped_folder_and_polls_until_done(tmp_path):
    data = make_data(tmp_path / "data")
    handler = build_script(job_json("queued"), job_json("running", step="encoding", done=1, total=4, eta_s=3.0),
                            job_json("running", step="tuning", done=2, total=2),
                            job_json("succeeded", version="v0003", activated=True, report={"n": 4},
                                     finished_at="2024-01-01T00:00:09+00:00"))
    client, sleeps = make_client(handler)
    seen: list[Job] = []
    job = client.build_cache("pets", data=data, shots=3, views=2, captioner="sidecar", progress=seen.append,
                             poll_interval=0.25)
    assert job.succeeded and job.version == "v0003" and job.activated and job.report == {"n": 4}
    assert [j.state for j in seen] == ["queued", "running", "running", "succeeded"]
    assert seen[1].step == "encoding" and seen[1].eta_s == 3.0 and seen[1].done == 1
    assert sleeps == [0.25, 0.25, 0.25]
    post, *polls = handler.requests
    assert post.method == "POST" and post.url.path == "/v1/caches/pets/builds"
    assert [(r.method, r.url.path) for r in polls] == [("GET", "/v1/jobs/ab12")] * 3
    fields, files = multipart(post)
    assert json.loads(fields["options"]) == {"shots": 3, "views": 2, "captioner": "sidecar", "activate": True}
    assert [(f, n) for f, n, _ in files] == [("data", "data.zip")]
    names = zipfile.ZipFile(io.BytesIO(files[0][2])).namelist()
    assert names == ["cat/0.png", "cat/0.txt", "cat/1.png", "cat/1.txt", "dog/0.png", "dog/0.txt",
                     "dog/1.png", "dog/1.txt"]  # label folders at the root, captions kept, hidden files not


@pytest.mark.parametrize("state, reason", [("failed", "class 'cat' has no readable images"), ("cancelled", None)])
def test_build_cache_raises_when_the_job_fails_or_is_cancelled(tmp_path, state, reason):
    handler = build_script(job_json("running"), job_json(state, error=reason))
    client, _ = make_client(handler)
    with pytest.raises(JobFailed) as info:
        client.build_cache("pets", labels=["cat", "dog"], poll_interval=0)
    assert info.value.job.state == state
    assert f"build of cache 'pets' {state} (job ab12): {reason or 'cancelled'}" == str(info.value)


def test_build_labels_only_sends_json_and_reads_files(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\n\ndog \n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na {}.\n")
    (tmp_path / "desc.json").write_text(json.dumps({"cat": ["a small feline"]}))
    handler = build_script(job_json("queued"))
    client, _ = make_client(handler)
    job = client.build_cache("pets", labels=tmp_path / "labels.txt", templates=str(tmp_path / "templates.txt"),
                             descriptions=tmp_path / "desc.json", shots="all", activate=False, wait=False,
                             seed=7, pool_per_class=4)
    assert job.state == "queued" and len(handler.requests) == 1
    post = handler.requests[0]
    assert post.headers["content-type"] == "application/json"
    assert json.loads(post.content) == {
        "labels": ["cat", "dog"], "templates": ["a photo of a {}.", "a {}."],
        "descriptions": {"cat": ["a small feline"]}, "shots": "all", "seed": 7, "pool_per_class": 4,
        "activate": False}


def test_build_with_a_pool_and_with_an_existing_archive(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "x.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    handler = build_script(job_json("queued"))
    client, _ = make_client(handler)
    client.build_cache("pets", labels=["cat", "dog"], pool=pool, wait=False)
    fields, files = multipart(handler.requests[0])
    assert json.loads(fields["options"])["labels"] == ["cat", "dog"]
    assert [(f, n) for f, n, _ in files] == [("pool", "pool.zip")]

    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(make_data(tmp_path / "d"), arcname="d")
    client.build_cache("pets", data=archive, data_dir=None, wait=False)
    _, files = multipart(handler.requests[1])
    assert files == [("data", "data.tar.gz", archive.read_bytes())]  # sent as is


def test_build_server_side_folders_and_bad_inputs(tmp_path):
    handler = build_script(job_json("queued"))
    client, _ = make_client(handler)
    client.build_cache("pets", data_dir="/srv/data/pets", wait=False)
    assert json.loads(handler.requests[0].content) == {"data_dir": "/srv/data/pets", "activate": True}
    with pytest.raises(InputError, match="needs data"):
        client.build_cache("pets")
    with pytest.raises(InputError, match="does not exist"):
        client.build_cache("pets", data=tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="neither a folder nor"):
        client.build_cache("pets", data=tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no files"):
        client.build_cache("pets", data=tmp_path / "empty")
    with pytest.raises(InputError, match="shots"):
        client.build_cache("pets", labels=["a"], shots="many")
    assert len(handler.requests) == 1


def test_job_calls():
    handler = Recorder(httpx.Response(200, json={"jobs": [job_json("running"), job_json("succeeded", id="cd")]}),
                       httpx.Response(200, json=job_json("running")),
                       httpx.Response(202, json=job_json("running", cancel_requested=True)))
    client, _ = make_client(handler)
    assert [j.id for j in client.jobs()] == ["ab12", "cd"]
    assert client.job("ab12").state == "running"
    assert client.cancel_job("ab12").id == "ab12"
    assert [(r.method, r.url.path) for r in handler.requests] == [
        ("GET", "/v1/jobs"), ("GET", "/v1/jobs/ab12"), ("DELETE", "/v1/jobs/ab12")]


def test_names_are_escaped_in_paths():
    handler = Recorder(httpx.Response(200, json=CACHE))
    make_client(handler)[0].cache("../admin")
    assert handler.requests[0].url.raw_path == b"/v1/caches/..%2Fadmin"


# --- async client: same operations --------------------------------------------------------

@pytest.mark.anyio
async def test_async_client_retries_and_builds(tmp_path):
    data = make_data(tmp_path / "data")
    handler = Recorder(error(503, "overloaded", "full", {"Retry-After": "1"}),
                       httpx.Response(202, json=job_json("queued")),
                       httpx.Response(200, json=job_json("succeeded", version="v0001")))
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with AsyncKvclipClient(URL, api_key="k", transport=httpx.MockTransport(handler), sleep=sleep) as client:
        seen: list[Job] = []
        job = await client.build_cache("pets", data=data, progress=seen.append, poll_interval=0.5)
    assert job.version == "v0001" and [j.state for j in seen] == ["queued", "succeeded"]
    assert sleeps == [1.0, 0.5]
    assert multipart(handler.requests[0]) == multipart(handler.requests[1])
    assert handler.requests[0].headers["authorization"] == "Bearer k"


@pytest.mark.anyio
async def test_async_client_errors():
    handler = Recorder(error(403, "forbidden", "the API key lacks the 'admin' scope"))
    async with AsyncKvclipClient(URL, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ApiError) as info:
            await client.activate("pets", "v0002")
    assert info.value.status == 403 and len(handler.requests) == 1
    assert json.loads(handler.requests[0].content) == {"version": "v0002"}


# --- progress display ---------------------------------------------------------------------

def test_job_progress_lines_without_a_terminal():
    out = io.StringIO()
    progress = JobProgress(out)
    for job in (Job.from_json(job_json("queued")),
                Job.from_json(job_json("running", step="encoding", done=1, total=4)),
                Job.from_json(job_json("running", step="encoding", done=3, total=4)),
                Job.from_json(job_json("succeeded", step="publishing", done=1, total=1))):
        progress(job)
    progress.close()
    assert out.getvalue().splitlines() == ["job ab12 queued: queued", "job ab12 running: encoding 1/4",
                                           "job ab12 succeeded: publishing 1/1"]


def test_job_progress_bar():
    out = io.StringIO()
    progress = JobProgress(out, live=True)
    progress(Job.from_json(job_json("running", step="encoding", done=2, total=4, elapsed_s=5, eta_s=75)))
    progress(Job.from_json(job_json("running", step="tuning", done=0, total=0)))
    progress.close()
    text = out.getvalue()
    assert "encoding" in text and "2/4" in text and "ETA 1:15" in text and "tuning" in text


def test_labels_and_templates_files_read_as_the_builder_reads_them(tmp_path):
    from kvclip.cache_builder.sources import read_labels_file
    from kvclip.clients.archives import read_labels, read_templates
    from kvclip.prompts import load_templates

    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\n  dog  \n")
    templates = tmp_path / "templates.txt"
    templates.write_text("# ImageNet-style\na photo of a {}.\n\n  a {}.  \n")
    assert read_labels(labels) == read_labels_file(labels) == ["cat", "dog"]
    assert read_templates(templates) == load_templates(templates) == ["a photo of a {}.", "a {}."]
    templates.write_text('["a {}",')
    with pytest.raises(InputError, match="not valid JSON"):
        read_templates(templates)
