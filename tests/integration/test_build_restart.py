"""A restarted server reports the jobs it ran, fails the interrupted ones, and removes what
they left: work folders, staging folders and the versions they published but never activated."""
from __future__ import annotations

import pytest

from kvclip import artifact as store
from kvclip.service.job_records import JobRecords
from kvclip.service.jobs import INTERRUPTED
from tests.service_helpers import copy_caches, make_config, running_app

pytestmark = pytest.mark.anyio


async def test_restart_fails_interrupted_jobs_and_removes_their_versions(served_caches, tiny_encoder, tmp_path):
    caches = copy_caches(served_caches, tmp_path / "caches")
    cache = caches / "fashion"
    config = make_config(caches)
    records = JobRecords(config.jobs_root)
    common = {"cache": "fashion", "options": {"shots": 2}, "created": 1.0, "started": 2.0}
    records.save({"id": "aaa111", "state": "running", "step": "publishing", **common})
    records.save({"id": "bbb222", "state": "succeeded", "finished": 3.0, "version": "v0002", **common})
    (config.jobs_root / "aaa111" / "data").mkdir(parents=True)  # its unpacked upload
    # what the killed worker of aaa111 had published: complete, never activated, still pending
    orphan = store.publish(cache, store.load_cache(cache), activate=False, owner="aaa111")
    # one pending for a job this server never ran (another replica's) is left alone
    foreign = store.publish(cache, store.load_cache(cache), activate=False, owner="ccc333")
    async with running_app(config, tiny_encoder) as (app, client):
        job = (await client.get("/v1/jobs/aaa111")).json()
        assert job["state"] == "failed" and job["error"] == INTERRUPTED
        assert (await client.get("/v1/jobs/bbb222")).json()["state"] == "succeeded"
        assert {j["id"] for j in (await client.get("/v1/jobs")).json()["jobs"]} == {"aaa111", "bbb222"}
        assert [p.name for p in config.jobs_root.iterdir()] == ["records"]
        assert orphan not in store.list_versions(cache) and foreign in store.list_versions(cache)
        assert store.pending_versions(cache) == {foreign: "ccc333"}
        assert (await client.get("/v1/caches/fashion")).status_code == 200
