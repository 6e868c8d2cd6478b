"""`kvclip serve` as a real process: uvicorn, env configuration, API keys, JSON logs,
cross-request batching over real sockets, and a clean exit on SIGTERM.

One server process is shared by the tests of this module (starting one costs seconds);
the SIGTERM test stops it, and the next test to need it starts another. Nothing here touches the network beyond 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess

import httpx
import pytest

from tests.server_process import serve_process
from tests.service_helpers import copy_caches, image_files, metric_value

READ_KEY, ADMIN_KEY = "reader", "boss"
READ = {"Authorization": f"Bearer {READ_KEY}"}
SIGTERM_WAIT_S = 120
ADMIN = {"X-API-Key": ADMIN_KEY}


@pytest.fixture(scope="module")
def servers(served_caches, tmp_path_factory):
    """The module's server, started on first use, and again if a test stopped it (SIGTERM)."""
    env = {"KVCLIP_API_KEYS": f"{READ_KEY}:read,{ADMIN_KEY}:admin",
           "KVCLIP_MAX_BATCH": "8", "KVCLIP_MAX_WAIT_MS": "50"}
    started = []
    with contextlib.ExitStack() as stack:
        def running():
            if not started or started[-1].proc.poll() is not None:
                root = tmp_path_factory.mktemp("uvicorn")
                caches = copy_caches(served_caches, root / "caches")
                started.append(stack.enter_context(serve_process(caches, root, "--log-format", "json", env=env)))
            return started[-1]
        yield running


@pytest.fixture
def server(servers):
    return servers()


def batch_metrics(url: str) -> tuple[float, float, float]:
    """(batches, images, batches of at most 8 images) from /metrics."""
    text = httpx.get(url + "/metrics", timeout=60).text
    return (metric_value(text, "kvclip_batch_images_count"), metric_value(text, "kvclip_batch_images_sum"),
            metric_value(text, "kvclip_batch_images_bucket", {"le": "8.0"}))


# --- the running server -------------------------------------------------------------------

def test_startup_logged_configuration_from_env(server):
    record = server.wait_for_record(lambda r: str(r.get("message", "")).startswith("configuration "))
    assert record["logger"] == "kvclip.service" and record["level"] == "info"
    config = json.loads(record["message"][len("configuration "):])
    assert config["max_batch"] == 8  # KVCLIP_MAX_BATCH
    assert config["max_wait_ms"] == 50.0  # KVCLIP_MAX_WAIT_MS, converted to float
    assert config["model"] == "tiny-random" and config["caches"] == str(server.caches)
    assert config["log_format"] == "json"
    text = server.log_text()
    assert f"{READ_KEY}:read" not in text and f"{ADMIN_KEY}:admin" not in text  # keys are never logged
    server.wait_for_record(lambda r: r.get("message") == "API keys: 2 configured")


def test_ready_lists_caches(server):
    body = httpx.get(server.url + "/readyz", timeout=60).json()
    assert body["ready"] is True and body["model"] == "tiny-random" and body["device"] == "cpu"
    assert body["caches"] == {"fashion": "v0001", "fashion-caps": "v0001"}
    assert body["errors"] == {}


def test_classify_with_read_key(server, fashion_test):
    files = image_files(fashion_test, 3)
    response = httpx.post(server.url + "/v1/classify", params={"cache": "fashion", "top_k": 3},
                          files=files, headers=READ, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cache"] == "fashion" and body["version"] == "v0001" and body["model"] == "tiny-random"
    assert [r["index"] for r in body["results"]] == [0, 1, 2]
    assert [r["name"] for r in body["results"]] == [name for _, (name, _, _) in files]
    for result in body["results"]:
        assert result["error"] is None and len(result["labels"]) == 3
        scores = [label["score"] for label in result["labels"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)


def test_auth_scopes(server, fashion_test):
    files = image_files(fashion_test, 1)
    url = server.url + "/v1/classify?cache=fashion"
    missing = httpx.post(url, files=files, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers.get("www-authenticate") == "Bearer"
    wrong = httpx.post(url, files=files, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    assert httpx.post(url, files=files, headers={"X-API-Key": READ_KEY}, timeout=30).status_code == 200
    assert httpx.post(url, files=files, headers=ADMIN, timeout=30).status_code == 200  # admin implies read

    activate = server.url + "/v1/caches/fashion/activate"
    forbidden = httpx.post(activate, json={"version": "v0002"}, headers=READ, timeout=30)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    assert httpx.post(activate, json={"version": "v0002"}, timeout=30).status_code == 401
    assert httpx.get(server.url + "/readyz", timeout=60).json()["caches"]["fashion"] == "v0001"

    try:
        done = httpx.post(activate, json={"version": "v0002"}, headers=ADMIN, timeout=30)
        assert done.status_code == 200, done.text
        assert done.json()["version"] == "v0002"
        assert (server.caches / "fashion" / "CURRENT").read_text().strip() == "v0002"
        after = httpx.post(url, files=files, headers=READ, timeout=30)
        assert after.status_code == 200 and after.json()["version"] == "v0002"
    finally:
        back = httpx.post(activate, json={"version": "v0001"}, headers=ADMIN, timeout=30)
        assert back.status_code == 200, back.text
    assert httpx.post(url, files=files, headers=READ, timeout=30).json()["version"] == "v0001"


def test_metrics_need_no_key(server):
    response = httpx.get(server.url + "/metrics", timeout=60)
    assert response.status_code == 200
    text = response.text
    for name in ("kvclip_http_requests_total", "kvclip_batch_images", "kvclip_queue_images",
                 "kvclip_ready", "kvclip_cache_info", "kvclip_model_info"):
        assert name in text
    assert metric_value(text, "kvclip_ready") == 1.0
    assert metric_value(text, "kvclip_cache_info", {"cache": "fashion", "version": "v0001"}) == 1.0
    assert metric_value(text, "kvclip_http_requests_total",
                        {"method": "POST", "route": "/v1/classify", "status": "200"}) >= 1


def test_request_id_in_header_and_json_log(server, fashion_test):
    files = image_files(fashion_test, 1)
    response = httpx.post(server.url + "/v1/classify", params={"cache": "fashion"}, files=files,
                          headers=READ, timeout=30)
    assert response.status_code == 200
    rid = response.headers["x-request-id"]
    assert rid and rid != "-"
    record = server.wait_for_record(lambda r: r.get("request_id") == rid)
    assert record["logger"] == "kvclip.access"
    assert record["path"] == "/v1/classify" and record["status"] == 200 and record["method"] == "POST"
    assert isinstance(record["duration_ms"], (int, float))

    # A client's own id is kept, echoed and logged; a hostile one is replaced.
    mine = httpx.post(server.url + "/v1/classify", params={"cache": "fashion"}, files=files,
                      headers={**READ, "X-Request-ID": "client-req.42"}, timeout=30)
    assert mine.headers["x-request-id"] == "client-req.42"
    server.wait_for_record(lambda r: r.get("request_id") == "client-req.42" and r.get("status") == 200)
    hostile = httpx.post(server.url + "/v1/classify", params={"cache": "fashion"}, files=files,
                         headers={**READ, "X-Request-ID": "bad id\twith spaces"}, timeout=30)
    assert hostile.headers["x-request-id"] not in ("", "bad id\twith spaces")
    assert " " not in hostile.headers["x-request-id"]


def test_env_max_batch_splits_large_request(server, fashion_test):
    before = batch_metrics(server.url)
    files = image_files(fashion_test, 20)
    response = httpx.post(server.url + "/v1/classify", params={"cache": "fashion", "top_k": 1},
                          files=files, headers=READ, timeout=60)
    assert response.status_code == 200, response.text
    assert [r["name"] for r in response.json()["results"]] == [name for _, (name, _, _) in files]
    batches, images, small = (a - b for a, b in zip(batch_metrics(server.url), before))
    assert images == 20
    assert batches >= 3  # 20 images in batches of at most 8 (KVCLIP_MAX_BATCH)
    assert small == batches, "a batch exceeded max_batch=8"


@pytest.mark.anyio
async def test_concurrent_requests_share_batches(server, fashion_test):
    files = image_files(fashion_test, 16)
    before = await asyncio.to_thread(batch_metrics, server.url)
    async with httpx.AsyncClient(base_url=server.url, headers=READ, timeout=60) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/classify", params={"cache": "fashion", "top_k": 2}, files=[item])
            for item in files
        ))
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
    assert [r.json()["results"][0]["name"] for r in responses] == [name for _, (name, _, _) in files]
    after = await asyncio.to_thread(batch_metrics, server.url)
    batches, images, small = (a - b for a, b in zip(after, before))
    assert images == 16
    assert batches < 16, f"16 concurrent requests ran in {batches:.0f} batches: no batch held more than one image"
    assert small == batches


def test_sigterm_exits_cleanly(server):
    """Stops the shared server (last in file order, so the others need no second one)."""
    assert server.proc.poll() is None
    server.proc.send_signal(signal.SIGTERM)
    try:  # generous: it exits at once when idle, but a loaded machine is slow to tear down
        code = server.proc.wait(timeout=SIGTERM_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kvclip serve still running {SIGTERM_WAIT_S} s after SIGTERM; "
                    f"log tail:\n{server.log_text()[-4000:]}")
    messages = [r.get("message") for r in server.log_records()]
    assert "Application shutdown complete." in messages, server.log_text()[-4000:]
    assert code == 0, (f"kvclip serve exited with {code} after a graceful SIGTERM shutdown "
                       f"(expected 0); log tail:\n{server.log_text()[-2000:]}")
