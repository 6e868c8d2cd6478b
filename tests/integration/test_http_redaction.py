"""Server paths (build sources, skipped files, job errors and folders, load errors) are shown to
admin keys only; read keys and unauthenticated probes see the last part of each path
(service/redact.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kvclip.service.jobs import BuildJob
from kvclip.service.redact import MARK, redact_text
from tests.service_helpers import copy_caches, image_files, make_config, running_app
from tests.waiting import until

pytestmark = pytest.mark.anyio

READ = {"Authorization": "Bearer reader"}
ADMIN = {"X-API-Key": "boss"}


@pytest.fixture(scope="module")
async def keyed(served_caches, tiny_encoder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVCLIP_API_KEYS", "reader:read,boss:admin")
        config = make_config(served_caches)
        async with running_app(config, tiny_encoder) as (app, client):
            yield app, client


async def test_read_keys_see_the_build_source_redacted(keyed, fashion_train):
    _, client = keyed
    admin = (await client.get("/v1/caches/fashion", headers=ADMIN)).json()["report"]
    reader = (await client.get("/v1/caches/fashion", headers=READ)).json()["report"]
    assert admin["source"] == str(fashion_train)
    assert reader["source"] == f"{MARK}/{Path(fashion_train).name}"
    assert str(Path(fashion_train).parent) not in str(reader)
    assert {k: v for k, v in reader.items() if k not in ("source", "skipped")} == \
        {k: v for k, v in admin.items() if k not in ("source", "skipped")}


async def test_read_keys_see_job_errors_and_folders_redacted(keyed, tmp_path):
    app, client = keyed
    secret = tmp_path / "srv" / "jobs" / "abc123" / "data" / "cat" / "broken.png"
    job = BuildJob(id="abc123def456", cache="fashion", workdir=tmp_path / "srv" / "jobs" / "abc123",
                   options={"data_dir": str(tmp_path / "srv" / "data"), "shots": 4},
                   state="failed", error=f"DataError: {secret}: not a readable image")
    app.state.kv.jobs._jobs[job.id] = job  # a finished job, as the manager records it
    try:
        for path in (f"/v1/jobs/{job.id}", "/v1/jobs"):
            admin = (await client.get(path, headers=ADMIN)).json()
            reader = (await client.get(path, headers=READ)).json()
            admin, reader = (admin["jobs"][0], reader["jobs"][0]) if "jobs" in admin else (admin, reader)
            assert str(secret) in admin["error"] and admin["options"]["data_dir"] == str(tmp_path / "srv" / "data")
            assert str(tmp_path) not in str(reader)
            assert reader["error"] == f"DataError: {MARK}/broken.png: not a readable image"
            assert reader["options"] == {"data_dir": f"{MARK}/data", "shots": 4}
    finally:
        del app.state.kv.jobs._jobs[job.id]


NO_ADMIN = {"no key": {}, "unknown key": {"X-API-Key": "guess"}, "read key": READ}


async def test_readyz_names_a_broken_cache_s_path_to_admin_keys_only(served_caches, tiny_encoder, tmp_path,
                                                                   monkeypatch, caplog):
    caches = copy_caches(served_caches, tmp_path / "caches")
    copy_caches(caches / "fashion", caches / "broken")
    version = (caches / "broken" / "CURRENT").read_text().strip()
    weights = caches / "broken" / "versions" / version / "text_weights.npy"
    weights.write_bytes(weights.read_bytes()[:64])  # a truncated file: the cache fails to load
    monkeypatch.setenv("KVCLIP_API_KEYS", "reader:read,boss:admin")
    with caplog.at_level(logging.ERROR, logger="kvclip"):
        async with running_app(make_config(caches), tiny_encoder) as (_, client):
            admin = (await client.get("/readyz", headers=ADMIN)).json()["errors"]["broken"]
            assert str(tmp_path) in admin, admin
            for who, headers in NO_ADMIN.items():
                response = await client.get("/readyz", headers=headers)
                assert response.status_code == 200, (who, response.text)  # a probe needs no key
                error = response.json()["errors"]["broken"]
                assert str(tmp_path) not in error and MARK in error, (who, error)
                assert error == redact_text(admin), who
    assert any(str(tmp_path) in r.getMessage() and "broken" in r.getMessage() for r in caplog.records)


async def test_a_failed_model_load_names_its_path_to_admin_keys_only(tmp_path, fashion_test, monkeypatch):
    monkeypatch.setenv("KVCLIP_API_KEYS", "reader:read,boss:admin")
    config = make_config(tmp_path, model="ViT-B-32:/nonexistent/secret/weights.pt")
    async with running_app(config, None, wait_ready=False) as (_, client):
        async def failed():
            ready = await client.get("/readyz", headers=ADMIN)
            return ready.json()["errors"] or None

        assert "/nonexistent/secret/weights.pt" in (await until(failed, what="the failed model load"))["model"]
        for who, headers in NO_ADMIN.items():
            ready = await client.get("/readyz", headers=headers)
            assert ready.status_code == 503, (who, ready.text)
            assert "/nonexistent/secret" not in ready.json()["errors"]["model"], who
        files = image_files(fashion_test, 1)
        reader = (await client.post("/v1/classify", params={"cache": "fashion"}, headers=READ, files=files)).json()
        admin = (await client.post("/v1/classify", params={"cache": "fashion"}, headers=ADMIN, files=files)).json()
        assert reader["error"]["code"] == admin["error"]["code"] == "not_ready"
        assert "/nonexistent/secret/weights.pt" in admin["error"]["message"]
        assert "/nonexistent/secret" not in reader["error"]["message"]
        assert f"{MARK}/weights.pt" in reader["error"]["message"]


def test_redact_text_keeps_what_is_not_a_path():
    assert redact_text("labels T-shirt/top and bag: 3 given") == "labels T-shirt/top and bag: 3 given"
    assert redact_text("'/a/b/c.png' (and /d/e)") == f"'{MARK}/c.png' (and {MARK}/e)"
