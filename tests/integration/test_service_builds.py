"""Builds over HTTP: POST /v1/caches/{name}/builds, GET/DELETE /v1/jobs/{id}.

One app (in-process, httpx over ASGI) serves the whole module, on real Fashion-MNIST images.
Its builds run the build worker on a thread (ThreadRunner: the same worker function and
cancel/progress protocol, without a process start); the tests marked by the `worker_processes`
or `warm_worker` fixture run it in worker processes that load the tiny model themselves, as the
server does, forked from a forkserver that imported torch once (the server spawns them:
tests/e2e/test_crash_safety.py).
"""
from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest

from kvclip import artifact as store
from kvclip.service.build_requests import build_config
from kvclip.service.build_worker import WorkerSpec
from kvclip.service.jobs import ProcessRunner, ThreadRunner, WarmRunner
from kvclip.service.schemas import BuildOptions
from tests.service_helpers import copy_caches, forkserver_context, image_files, make_config, metric_value, running_app
from tests.waiting import until

pytestmark = pytest.mark.anyio
CLASSIFY = "/v1/classify"
ADMIN = {"Authorization": "Bearer boss"}
READ = {"Authorization": "Bearer reader"}
FAST = {"shots": 3, "views": 2, "captioner": "none"}
STEPS = ("starting", "activating", "reading", "pseudo-labelling", "text", "captioning", "synthesizing", "encoding",
         "caption-keys", "tuning", "indexing", "publishing")


def zip_folder(folder: Path, labels: list[str] | None = None, wrap: str | None = None) -> bytes:
    """An in-memory zip of DATA/<label>/<image>; optionally only some labels, inside `wrap/`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and (labels is None or path.parent.name in labels):
                rel = path.relative_to(folder).as_posix()
                archive.write(path, f"{wrap}/{rel}" if wrap else rel)
    return buffer.getvalue()


def tar_folder(folder: Path, labels: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for label in labels:
            archive.add(folder / label, arcname=label)
    return buffer.getvalue()


def zip_entries(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


async def post_build(client, name: str, options: dict, data: bytes | None = None, headers=ADMIN,
                     filename: str = "data.zip"):
    if data is None:
        return await client.post(f"/v1/caches/{name}/builds", json=options, headers=headers)
    return await client.post(f"/v1/caches/{name}/builds", data={"options": json.dumps(options)},
                             files={"data": (filename, data, "application/zip")}, headers=headers)


async def wait_job(client, job_id: str, timeout: float = 300.0, until=None) -> dict:
    """Poll the job until it ends (or `until(job)` holds); returns the last JSON."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = []
    while True:
        job = (await client.get(f"/v1/jobs/{job_id}", headers=READ)).json()
        seen.append(job)
        if job["state"] in ("succeeded", "failed", "cancelled") or (until and until(job)):
            job["_seen"] = seen
            return job
        if loop.time() > deadline:
            raise AssertionError(f"job still {job['state']} after {timeout} s: {job}")
        await asyncio.sleep(0.1)


def assert_error(response, status: int, code: str, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


@pytest.fixture(scope="module")
async def app_client(served_caches, tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("builds")
    caches = copy_caches(served_caches, root / "caches")
    (root / "allowed").mkdir()
    # Builds run on a thread (make_config), keeping this process's nice and torch threads.
    config = make_config(caches, build_roots=str(root / "allowed"), max_extracted_bytes=2_000_000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVCLIP_API_KEYS", "reader:read,boss:admin")
        async with running_app(config, tiny_encoder) as (app, client):
            assert isinstance(app.state.kv.jobs.runner, ThreadRunner)
            yield app, client, root


@pytest.fixture
def worker_processes(app_client):
    """This test's builds run in a fresh worker process each (build_worker "process")."""
    jobs = app_client[0].state.kv.jobs
    jobs.runner = ProcessRunner(forkserver_context())
    yield
    jobs.runner = ThreadRunner()


@pytest.fixture(scope="module")
def warm_runner():
    """One warm worker for the module's warm tests (a test that kills it leaves its replacement)."""
    runner = WarmRunner(context=forkserver_context())
    runner.warm()
    yield runner
    runner.close()


@pytest.fixture
def warm_worker(app_client, warm_runner):
    """This test's builds run in the warm worker process, as in the server by default."""
    jobs = app_client[0].state.kv.jobs
    jobs.runner = warm_runner
    yield warm_runner
    jobs.runner = ThreadRunner()


def build_processes() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("kvclip-build-")]


@pytest.fixture
def client(app_client):
    return app_client[1]


async def test_upload_builds_publishes_and_activates_a_new_cache(client, fashion_train, fashion_test):
    labels = ["sandal", "sneaker", "bag"]
    response = await post_build(client, "shoes", FAST, zip_folder(fashion_train, labels, wrap="shoes"))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["cache"] == "shoes" and job["state"] in ("queued", "running")

    job = await wait_job(client, job["id"])
    assert job["state"] == "succeeded", job
    assert job["version"] == "v0001" and job["activated"] and job["error"] is None
    assert job["report"]["used"] == 9 and job["elapsed_s"] > 0 and job["finished_at"]
    steps = [j["step"] for j in job["_seen"] if j["step"]]
    assert steps and all(s in STEPS for s in steps), steps
    assert all(j["done"] <= j["total"] or j["total"] == 0 for j in job["_seen"])

    detail = (await client.get("/v1/caches/shoes", headers=READ)).json()
    assert detail["version"] == "v0001" and detail["items"] == 9 and detail["classes"] == 3
    assert sorted(detail["labels"]) == sorted(labels)  # the wrapping folder was not a label
    body = (await client.post(CLASSIFY, params={"cache": "shoes"}, files=image_files(fashion_test, 2),
                              headers=READ)).json()
    assert [r["labels"][0]["label"] in labels for r in body["results"]] == [True, True]
    listed = (await client.get("/v1/jobs", headers=READ)).json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]


async def test_a_build_of_a_served_cache_swaps_in_and_tar_works(client, fashion_train):
    before = (await client.get("/v1/caches/fashion", headers=READ)).json()
    labels = ["trouser", "dress"]
    options = {**FAST, "activate": True}
    response = await post_build(client, "fashion", options, tar_folder(fashion_train, labels), filename="d.tgz")
    job = await wait_job(client, response.json()["id"])
    assert job["state"] == "succeeded", job
    after = (await client.get("/v1/caches/fashion", headers=READ)).json()
    assert after["version"] == job["version"] != before["version"]
    assert after["classes"] == 2 and job["version"] in after["versions"]
    # Put the original back for the other tests.
    assert (await client.post("/v1/caches/fashion/activate", json={"version": before["version"]},
                              headers=ADMIN)).status_code == 200


async def test_no_activate_publishes_without_serving(client, fashion_train):
    before = (await client.get("/v1/caches/fashion", headers=READ)).json()
    response = await post_build(client, "fashion", {**FAST, "activate": False},
                                zip_folder(fashion_train, ["bag", "coat"]))
    job = await wait_job(client, response.json()["id"])
    assert job["state"] == "succeeded" and not job["activated"]
    after = (await client.get("/v1/caches/fashion", headers=READ)).json()
    assert after["version"] == before["version"] and job["version"] in after["versions"]


async def test_failed_build_leaves_the_served_version_and_publishes_nothing(client, app_client):
    root = app_client[2]
    before = (await client.get("/v1/caches/fashion", headers=READ)).json()
    corrupt = zip_entries({"cat/a.png": b"not a png", "dog/b.png": b"\x89PNG broken"})
    response = await post_build(client, "fashion", FAST, corrupt)
    assert response.status_code == 202
    job = await wait_job(client, response.json()["id"])
    assert job["state"] == "failed" and job["error"] and not job["activated"] and job["version"] is None
    after = (await client.get("/v1/caches/fashion", headers=READ)).json()
    assert after["version"] == before["version"] and after["versions"] == before["versions"]
    assert store.current_version(root / "caches" / "fashion") == before["version"]
    assert not (root / "caches" / ".jobs" / job["id"]).exists()  # the work folder is cleaned up


async def test_cancel_a_running_build(client, fashion_train, app_client, worker_processes):
    root = app_client[2]
    before = (await client.get("/v1/caches/fashion", headers=READ)).json()
    slow = {"shots": 16, "views": 16, "captioner": "none"}  # 3 encoder batches: time to cancel between
    response = await post_build(client, "fashion", slow, zip_folder(fashion_train))
    job_id = response.json()["id"]
    # Cancelled as encoding starts: the worker stops before its next batch (ETA: tests/unit/test_jobs.py).
    running = await wait_job(client, job_id, until=lambda j: j["step"] == "encoding")
    assert running["state"] == "running", running
    cancelled = await client.delete(f"/v1/jobs/{job_id}", headers=ADMIN)
    assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"]
    job = await wait_job(client, job_id)
    assert job["state"] == "cancelled" and job["version"] is None
    await until(lambda: not build_processes(), what="the cancelled worker process ending")
    after = (await client.get("/v1/caches/fashion", headers=READ)).json()
    assert after["version"] == before["version"] and after["versions"] == before["versions"]
    assert sorted(p.name for p in (root / "caches" / "fashion" / "versions").iterdir()) == before["versions"]
    # Cancelling an ended job changes nothing.
    again = await client.delete(f"/v1/jobs/{job_id}", headers=ADMIN)
    assert again.status_code == 202 and again.json()["state"] == "cancelled"


async def test_classify_keeps_answering_while_a_build_runs(client, fashion_train, fashion_test):
    response = await post_build(client, "busy", {"shots": 16, "views": 8, "captioner": "none"},
                                zip_folder(fashion_train))
    job_id = response.json()["id"]
    await wait_job(client, job_id, until=lambda j: j["state"] == "running")
    files = image_files(fashion_test, 1)
    answered = 0
    while (await client.get(f"/v1/jobs/{job_id}", headers=READ)).json()["state"] == "running":
        r = await client.post(CLASSIFY, params={"cache": "fashion"}, files=files, headers=READ)
        assert r.status_code == 200, r.text
        answered += 1
    assert answered >= 3
    assert (await wait_job(client, job_id))["state"] == "succeeded"


async def test_server_folders_only_under_build_roots(client, fashion_train, app_client):
    root = app_client[2]
    allowed = root / "allowed" / "data"
    for label in ("shirt", "coat"):
        (allowed / label).mkdir(parents=True)
        for path in sorted((fashion_train / label).glob("*.png"))[:3]:
            (allowed / label / path.name).write_bytes(path.read_bytes())
    assert_error(await post_build(client, "x", {**FAST, "data_dir": str(fashion_train)}), 403, "forbidden",
                 "not under a configured build root")
    assert_error(await post_build(client, "x", {**FAST, "data_dir": str(allowed / ".." / ".." / "caches")}),
                 403, "forbidden")
    assert_error(await post_build(client, "x", {**FAST, "data_dir": str(allowed / "missing")}), 422,
                 "invalid_parameters", "not a folder")
    response = await post_build(client, "fromdir", {**FAST, "data_dir": str(allowed)})
    assert response.status_code == 202, response.text
    job = await wait_job(client, response.json()["id"])
    assert job["state"] == "succeeded", job
    assert (await client.get("/v1/caches/fromdir", headers=READ)).json()["items"] == 6


async def test_request_errors(client, app_client):
    url = "/v1/caches/fashion/builds"
    assert_error(await client.post(url, content=b"x", headers={**ADMIN, "content-type": "text/plain"}),
                 415, "unsupported_media_type")
    assert_error(await post_build(client, "fashion", {"shots": 4}), 422, "invalid_parameters", "labels")
    assert_error(await post_build(client, "fashion", {"labels": ["a", "a"]}), 422, "invalid_parameters", "unique")
    assert_error(await post_build(client, "fashion", {"labels": ["a"], "templates": ["no slot"]}), 422,
                 "invalid_parameters", "{}")
    assert_error(await post_build(client, "fashion", {"labels": ["a"], "bogus": 1}), 422, "invalid_parameters")
    # The builder's own rules, checked before a job starts: a label is one line, labels differ
    # as prompts read them, a template has exactly one {}.
    assert_error(await post_build(client, "fashion", {"labels": ["a\nb", "c"]}), 422, "invalid_parameters",
                 "several lines")
    assert_error(await post_build(client, "fashion", {"labels": ["Dog", "dog"]}), 422, "invalid_parameters",
                 "same class")
    assert_error(await post_build(client, "fashion", {"labels": ["a"], "templates": ["{} and {}"]}), 422,
                 "invalid_parameters", "exactly one")
    assert_error(await client.post(url, content=b"{nope", headers={**ADMIN, "content-type": "application/json"}),
                 400, "bad_json")
    assert_error(await post_build(client, "fashion", FAST, b"not an archive"), 400, "bad_archive", "zip nor a tar")
    evil = zip_entries({"../../escape/a.png": b"x"})
    assert_error(await post_build(client, "fashion", FAST, evil), 400, "bad_archive", "outside the archive")
    bomb = zip_entries({"cat/a.png": b"\0" * 3_000_000})  # limit in this app: 2 MB unpacked
    assert_error(await post_build(client, "fashion", FAST, bomb), 413, "too_large", "unpacks to more than")
    both = await client.post(url, data={"options": json.dumps({**FAST, "labels": ["a"]})},
                             files={"data": ("d.zip", zip_entries({"a/x.png": b"1"})),
                                    "pool": ("p.zip", zip_entries({"x.png": b"1"}))}, headers=ADMIN)
    assert_error(both, 422, "invalid_parameters", "not both")
    assert_error(await post_build(client, "bad%20name", {"labels": ["a"]}), 422, "invalid_parameters")
    assert_error(await client.get("/v1/jobs/abc123", headers=READ), 404, "unknown_job")
    assert_error(await client.delete("/v1/jobs/abc123", headers=ADMIN), 404, "unknown_job")
    assert not [p for p in (app_client[2] / "caches" / ".jobs").glob("*") if p.name != "records"], \
        "refused requests leave no work folder"


async def test_build_scopes(client):
    assert_error(await post_build(client, "fashion", {"labels": ["a", "b"]}, headers=READ), 403, "forbidden")
    assert_error(await post_build(client, "fashion", {"labels": ["a", "b"]}, headers={}), 401, "unauthorized")
    assert (await client.get("/v1/jobs", headers=READ)).status_code == 200
    assert_error(await client.get("/v1/jobs", headers={}), 401, "unauthorized")


async def labels_build(client, cache: str) -> dict:
    job = await wait_job(client, (await post_build(client, cache, {"labels": ["a", "b"]})).json()["id"])
    assert job["state"] == "succeeded", job
    return job


async def test_a_crashed_worker_fails_only_its_job(client, fashion_train, fashion_test, warm_worker):
    await labels_build(client, "warm-a")
    [worker] = build_processes()
    await labels_build(client, "warm-b")
    assert build_processes() == [worker]  # the same process ran both jobs
    before = (await client.get("/v1/caches/fashion", headers=READ)).json()
    slow = {"shots": 16, "views": 16, "captioner": "none"}
    job_id = (await post_build(client, "fashion", slow, zip_folder(fashion_train))).json()["id"]
    await wait_job(client, job_id, until=lambda j: j["step"] == "encoding")
    worker.kill()  # as the kernel's out-of-memory killer would
    job = await wait_job(client, job_id)
    assert job["state"] == "failed" and job["version"] is None, job
    assert "exited with code -9 without a result" in job["error"]
    after = (await client.get("/v1/caches/fashion", headers=READ)).json()
    assert after["version"] == before["version"] and after["versions"] == before["versions"]
    r = await client.post(CLASSIFY, params={"cache": "fashion"}, files=image_files(fashion_test, 1), headers=READ)
    assert r.status_code == 200, r.text
    # A fresh warm worker replaces the killed one and runs the next jobs.
    [fresh] = await until(lambda: [p for p in build_processes() if p.is_alive()], what="a fresh build worker")
    assert fresh.pid != worker.pid
    await labels_build(client, "warm-c")
    assert build_processes() == [fresh]


async def test_a_cancel_of_a_warm_workers_job_keeps_the_worker_for_the_next(client, fashion_train, warm_worker):
    slow = {"shots": 16, "views": 16, "captioner": "none"}
    job_id = (await post_build(client, "fashion", slow, zip_folder(fashion_train))).json()["id"]
    await wait_job(client, job_id, until=lambda j: j["step"] == "encoding")
    [worker] = build_processes()
    await client.delete(f"/v1/jobs/{job_id}", headers=ADMIN)
    job = await wait_job(client, job_id)
    assert job["state"] == "cancelled" and job["version"] is None, job
    # The next job is not cancelled by the earlier cancel, and runs in the same process.
    await labels_build(client, "after-cancel")
    assert build_processes() == [worker] and worker.is_alive()


async def test_build_metrics(client):
    def jobs_total(text: str, state: str) -> float:
        return metric_value(text, "kvclip_build_jobs_total", {"state": state})

    before = (await client.get("/metrics")).text
    response = await post_build(client, "counted", {"labels": ["a", "b"]})
    assert (await wait_job(client, response.json()["id"]))["state"] == "succeeded"
    after = (await client.get("/metrics")).text
    for state in ("queued", "succeeded"):
        assert jobs_total(after, state) == jobs_total(before, state) + 1, state
    assert metric_value(after, "kvclip_build_jobs_running") == 0


async def test_labels_only_build_serves_a_zero_shot_cache(client, app_client, fashion_test):
    labels = ["a photo of a dog", "a cat", "a bird"]
    response = await post_build(client, "animals", {"labels": labels, "templates": ["{}", "a picture of {}"],
                                                    "descriptions": {"a cat": ["a small pet that purrs"]}})
    assert response.status_code == 202, response.text
    job = await wait_job(client, response.json()["id"])
    assert job["state"] == "succeeded" and job["activated"], job
    assert job["report"]["mode"] == "labels-only"
    assert job["report"]["source"] == "3 labels given in memory"  # no labels file was written for the worker
    prompts = store.load_cache(app_client[2] / "caches" / "animals").manifest.prompts
    assert prompts.templates == ["{}", "a picture of {}"] and prompts.descriptions == {"a cat": ["a small pet that purrs"]}
    detail = (await client.get("/v1/caches/animals", headers=READ)).json()
    assert detail["labels"] == labels and detail["items"] == 0 and detail["methods"] == ["zeroshot"]
    body = (await client.post(CLASSIFY, params={"cache": "animals", "explain": "true"},
                              files=image_files(fashion_test, 1), headers=READ)).json()
    assert body["method"] == "zeroshot" and body["results"][0]["neighbors"] == []
    assert {lb["label"] for lb in body["results"][0]["labels"]} == set(labels)


async def test_pool_upload_builds_a_pseudo_labelled_cache(client, fashion_train):
    labels = ["trouser", "bag", "sneaker"]
    pool = io.BytesIO()
    with zipfile.ZipFile(pool, "w") as archive:  # unlabelled: flat file names, labels hidden
        for i, path in enumerate(sorted(p for lb in labels for p in (fashion_train / lb).glob("*.png"))):
            archive.write(path, f"pool/{i:03d}.png")
    response = await client.post("/v1/caches/pooled/builds", headers=ADMIN,
                                 data={"options": json.dumps({"labels": labels, "pool_per_class": 2,
                                                              "views": 2, "captioner": "none"})},
                                 files={"pool": ("pool.zip", pool.getvalue(), "application/zip")})
    assert response.status_code == 202, response.text
    job = await wait_job(client, response.json()["id"])
    assert job["state"] == "succeeded", job
    report = job["report"]
    assert report["mode"] == "pool" and report["pool"]["images"] == 48
    kept = {label: entry["count"] for label, entry in report["pool"]["per_class"].items()}
    assert set(kept) == set(labels) and all(0 <= n <= 2 for n in kept.values())
    detail = (await client.get("/v1/caches/pooled", headers=READ)).json()
    assert detail["items"] == sum(kept.values()) and detail["best_method"] == "tip"


def test_build_options_reach_the_worker_as_values(tmp_path):
    """Labels, templates and descriptions travel in the worker spec (pickled to the spawned
    process), not as files in the job's folder."""
    options = BuildOptions(labels=["cat", "dog"], templates=["a {}"], descriptions={"dog": ["a pet that barks"]})
    config = build_config("pets", options, None, None, make_config(tmp_path / "caches"))
    spec = pickle.loads(pickle.dumps(WorkerSpec(config=config, nice=0, threads=1)))
    assert spec.config.labels == ["cat", "dog"] and spec.config.labels_file is None
    assert spec.config.templates == ["a {}"] and spec.config.descriptions == {"dog": ["a pet that barks"]}
    assert not any(tmp_path.iterdir())
    defaults = build_config("pets", BuildOptions(data_dir="d"), tmp_path / "d", None, make_config(tmp_path))
    assert defaults.labels is None and defaults.templates is None and defaults.descriptions is None
