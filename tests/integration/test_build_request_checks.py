"""Build requests over HTTP: bad labels and class folder names are 422 at request time, uploads
share one unpack budget and keep free disk space, links out of a build root are skipped and
reported."""
from __future__ import annotations

import shutil

import pytest

from tests.integration.test_service_builds import assert_error, post_build, wait_job, zip_entries, zip_folder
from tests.service_helpers import copy_caches, make_config, running_app

pytestmark = pytest.mark.anyio
ADMIN = {"Authorization": "Bearer boss"}
FAST = {"shots": 2, "views": 2, "captioner": "none"}


@pytest.fixture
def api_keys(monkeypatch):
    monkeypatch.setenv("KVCLIP_API_KEYS", "reader:read,boss:admin")


async def test_labels_and_folder_names_are_refused_before_a_job_exists(served_caches, tiny_encoder, tmp_path,
                                                                      api_keys):
    caches = copy_caches(served_caches, tmp_path / "caches")
    async with running_app(make_config(caches), tiny_encoder) as (app, client):
        for label in ("ca\x00t", "do\x07g", "cat\u202egod"):
            error = assert_error(await post_build(client, "pets", {"labels": ["fine", label]}), 422,
                                 "invalid_parameters", "control character")
            assert repr(label) in error["message"]
        archive = zip_entries({"cat/a.png": b"x", "sea\nlion/b.png": b"y"})
        assert_error(await post_build(client, "pets", FAST, archive), 422, "invalid_parameters",
                     "class folder names", "spans several lines")
        assert (await client.get("/v1/jobs", headers=ADMIN)).json()["jobs"] == []
        assert [p.name for p in (caches / ".jobs").glob("*") if p.name != "records"] == []


async def test_uploads_share_one_budget_and_keep_free_disk(served_caches, tiny_encoder, tmp_path, fashion_train,
                                                           api_keys):
    caches = copy_caches(served_caches, tmp_path / "caches")
    upload = zip_folder(fashion_train)
    size = sum(p.stat().st_size for p in fashion_train.rglob("*") if p.is_file())
    config = make_config(caches, max_unpacked_total_bytes=size + size // 2)
    async with running_app(config, tiny_encoder) as (app, client):
        app.state.kv.jobs.stop()  # nothing runs: the first upload stays queued, holding its share
        first = await post_build(client, "pets", FAST, upload)
        assert first.status_code == 202
        assert_error(await post_build(client, "pets", FAST, upload), 413, "too_large", "queued and running builds")
        await client.delete(f"/v1/jobs/{first.json()['id']}", headers=ADMIN)  # its share comes back
        assert (await post_build(client, "pets", FAST, upload)).status_code == 202
    config = make_config(caches, min_free_disk_bytes=2**62)
    async with running_app(config, tiny_encoder) as (app, client):
        assert_error(await post_build(client, "pets", FAST, upload), 413, "too_large", "bytes free")


async def test_links_out_of_a_build_root_are_skipped_and_reported(served_caches, tiny_encoder, tmp_path,
                                                                 fashion_train, api_keys):
    caches = copy_caches(served_caches, tmp_path / "caches")
    data = tmp_path / "allowed" / "data"
    for label in ("coat", "bag"):
        shutil.copytree(fashion_train / label, data / label)
    secret = tmp_path / "secret.png"
    shutil.copy(next((fashion_train / "coat").iterdir()), secret)
    (data / "coat" / "zz-leak.png").symlink_to(secret)
    config = make_config(caches, build_roots=str(tmp_path / "allowed"))
    async with running_app(config, tiny_encoder) as (app, client):
        response = await post_build(client, "linked", {**FAST, "shots": "all", "data_dir": str(data)})
        assert response.status_code == 202, response.text
        job = await wait_job(client, response.json()["id"], timeout=240)
        assert job["state"] == "succeeded", job
        # A read key sees server paths redacted; the admin key sees where the link is.
        assert [s["path"] for s in job["report"]["skipped"]] == ["<server path>/zz-leak.png"]
        full = (await client.get(f"/v1/jobs/{job['id']}", headers=ADMIN)).json()
        skipped = {s["path"]: s["reason"] for s in full["report"]["skipped"]}
        assert "symbolic link to outside" in skipped[str(data / "coat" / "zz-leak.png")]
        assert (await client.get("/v1/caches/linked", headers=ADMIN)).status_code == 200
