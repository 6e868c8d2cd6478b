"""Server paths (build sources, skipped files, job errors and folders) are shown to admin keys
only; read keys see the last part of each path (service/redact.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvclip.service.jobs import BuildJob
from kvclip.service.redact import MARK, redact_text
from tests.service_helpers import make_config, running_app

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


def test_redact_text_keeps_what_is_not_a_path():
    assert redact_text("labels T-shirt/top and bag: 3 given") == "labels T-shirt/top and bag: 3 given"
    assert redact_text("'/a/b/c.png' (and /d/e)") == f"'{MARK}/c.png' (and {MARK}/e)"
