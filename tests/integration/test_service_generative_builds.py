"""Builds over HTTP with the generative options: captioner hf:NAME / openai:URL and Stable
Diffusion synthesis. Invalid options are 422 naming the field; models load only from the
server's --models-dir; the caption API key is never echoed; the job shows its captioning and
rendering steps with done/total; explain shows each neighbour's provenance.

The app runs in-process with the build worker on a thread (ThreadRunner), so the tests can
hold a step open (the fake endpoint waits, a gated renderer waits) and watch the job there.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import torch

from kvclip import artifact as store
from kvclip.cache_builder import synthesize
from kvclip.service.jobs import ThreadRunner
from tests.conftest import write_images
from tests.fake_openai import FakeChat, serving
from tests.integration.test_service_builds import assert_error, post_build, wait_job, zip_folder
from tests.service_helpers import image_files, make_config, running_app
from tests.tiny_hf import save_tiny_blip, save_tiny_stable_diffusion
from tests.waiting import until

pytestmark = pytest.mark.anyio
ADMIN = {"Authorization": "Bearer boss"}
READ = {"Authorization": "Bearer reader"}
SECRET = "sk-test-3b1f9e0c7d"  # the caption API key: must never come back
FAST = {"shots": 3, "views": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A --models-dir with a tiny BLIP (blip) and a tiny Stable Diffusion (org/tiny-sd)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_tiny_blip(root / "blip")
    sd = save_tiny_stable_diffusion(root / "scratch")
    (root / "org").mkdir()
    sd.rename(root / "org" / "tiny-sd")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("pets")
    for i, label in enumerate(["cat", "dog"]):
        write_images(root / label, 3, seed=i)
    return zip_folder(root)


@pytest.fixture(scope="module")
async def app_client(models, tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    (root / "caches").mkdir()
    (root / "outside").mkdir()
    (models / "escape").symlink_to(root / "outside", target_is_directory=True)  # a link out of --models-dir
    config = make_config(root / "caches", models_dir=models, explain_k=64, build_nice=0,
                         build_threads=torch.get_num_threads())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVCLIP_API_KEYS", "reader:read,boss:admin")
        mp.setenv("OPENAI_API_KEY", "the-server-s-own-key")  # never sent to an endpoint a request names
        async with running_app(config, tiny_encoder) as (app, client):
            app.state.kv.jobs.runner = ThreadRunner()
            yield app, client, root


@pytest.fixture
def client(app_client):
    return app_client[1]


@pytest.mark.parametrize("options, field", [
    ({"captioner": "hf:"}, "captioner"),
    ({"captioner": "hf:../blip"}, "captioner"),
    ({"captioner": "hf:/etc"}, "captioner"),
    ({"captioner": "openai:file:///etc/passwd", "captioner_model": "m"}, "captioner"),
    ({"captioner": "openai:ftp://example.org/v1", "captioner_model": "m"}, "captioner"),
    ({"captioner": "openai:http://user:pw@example.org/v1", "captioner_model": "m"}, "captioner"),
    ({"captioner": "openai:http://example.org/v1"}, "captioner_model"),
    ({"captioner": "coca", "captioner_model": "coca_ViT-B-32:/srv/weights.pt"}, "captioner_model"),
    ({"captioner": "none", "captioner_model": "m"}, "captioner_model"),
    ({"captioner": "hf:blip", "caption_prompt": "Describe it."}, "caption_prompt"),
    ({"captioner": "auto", "caption_api_key": SECRET}, "caption_api_key"),
    ({"synthesize": -1}, "synthesize"),
    ({"synthesize": 100_000}, "synthesize"),
    ({"support": "synthetic"}, "support"),
    ({"synthesize": 2, "support": "real"}, "support"),
    ({"synthesize": 2, "steps": 0}, "steps"),
    ({"synthesize": 2, "guidance": -1}, "guidance"),
    ({"synthesize": 2, "sd_model": "../org/tiny-sd"}, "sd_model"),
])
async def test_invalid_generative_options_are_422_naming_the_field(client, data, options, field):
    error = assert_error(await post_build(client, "pets", {**FAST, **options}, data), 422, "invalid_parameters")
    assert [d["field"] for d in error["details"]] == [field], error
    assert SECRET not in json.dumps(error)


@pytest.mark.parametrize("options, status, fragment", [
    ({"captioner": "hf:missing"}, 422, "no such model folder"),
    ({"captioner": "hf:escape"}, 403, "not a folder under the server's --models-dir"),
    ({"synthesize": 1, "sd_model": "nowhere/sd"}, 422, "no such model folder"),
    ({"synthesize": 1, "sd_model": "escape"}, 403, "not a folder under the server's --models-dir"),
])
async def test_models_are_folders_under_the_models_dir(client, data, models, options, status, fragment):
    before = len((await client.get("/v1/jobs", headers=ADMIN)).json()["jobs"])
    error = assert_error(await post_build(client, "pets", {**FAST, **options}, data), status,
                         "forbidden" if status == 403 else "invalid_parameters", fragment)
    assert str(models) not in error["message"]  # the server's layout is not disclosed
    assert len((await client.get("/v1/jobs", headers=ADMIN)).json()["jobs"]) == before  # no job was made


async def test_without_a_models_dir_hf_and_synthesis_are_refused(served_caches, tiny_encoder, tmp_path, data,
                                                                  monkeypatch):
    monkeypatch.setenv("KVCLIP_API_KEYS", "boss:admin")
    (tmp_path / "caches").mkdir()
    async with running_app(make_config(tmp_path / "caches"), tiny_encoder) as (app, client):
        for options in ({"captioner": "hf:blip"}, {"synthesize": 1}):
            assert_error(await post_build(client, "pets", {**FAST, **options}, data), 403, "forbidden",
                         "--models-dir")
        assert (await client.get("/v1/jobs", headers=ADMIN)).json()["jobs"] == []


@pytest.fixture
def gated_renderer(monkeypatch):
    """The real renderer, whose second and later batches wait until `open` is set."""
    original = synthesize.Renderer.__call__
    gate, batches = threading.Event(), []

    def gated(self, prompts, seeds, guidance, steps):
        batches.append(len(prompts))
        if len(batches) > 1:
            gate.wait(120)
        return original(self, prompts, seeds, guidance, steps)

    monkeypatch.setattr(synthesize.Renderer, "__call__", gated)
    return gate, batches


async def test_openai_captions_and_synthesis_show_their_steps_and_never_echo_the_key(
        client, app_client, data, gated_renderer, fashion_test, caplog):
    gate, batches = gated_renderer
    chat = FakeChat(reply=lambda body: "a small animal on a rug", release=threading.Event())
    with serving(chat) as url, caplog.at_level(logging.DEBUG):
        options = {**FAST, "captioner": f"openai:{url}", "captioner_model": "vision-1", "caption_prompt": "One sentence.",
                   "caption_api_key": SECRET, "synthesize": 3, "sd_model": "org/tiny-sd", "steps": 2}
        response = await post_build(client, "pets", options, data)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        # Captioning: the endpoint holds every request, so the job sits in that step, 0 of 6 done.
        job = await wait_job(client, job_id, until=lambda j: j["step"] == "captioning")
        assert (job["done"], job["total"]) == (0, 6), job
        await until(lambda: len(chat.requests) == 4, what="4 caption requests in flight (concurrency 4)")
        chat.release.set()
        # Rendering: 2 classes x 3 images in batches of 4; the second batch waits at the gate.
        job = await wait_job(client, job_id, until=lambda j: j["step"] == "synthesizing" and j["done"] == 4)
        assert job["total"] == 6 and job["state"] == "running" and job["eta_s"] is not None and job["eta_s"] >= 0
        gate.set()
        job = await wait_job(client, job_id)
    assert job["state"] == "succeeded", job
    assert batches == [4, 2]

    # The key went to the endpoint, and only the key: not the server's own $OPENAI_API_KEY.
    assert len(chat.requests) == 6 and set(chat.authorizations) == {f"Bearer {SECRET}"}
    assert all(r["messages"][0]["content"][0]["text"] == "One sentence." for r in chat.requests)
    report = job["report"]
    assert report["origin_per_class"] == {"cat": {"real": 3, "synthetic": 3}, "dog": {"real": 3, "synthetic": 3}}
    assert report["captioner"] == {"name": "openai", "model": "vision-1", "endpoint": url, "prompt": "One sentence.",
                                   "cached": 0}
    assert report["synthesis"]["rendered"] == 6 and job["options"]["synthesize"] == 3
    # Never echoed: not in the job (either scope), its record on disk, the cache's files or the logs.
    root = app_client[2]
    seen = [json.dumps((await client.get(f"/v1/jobs/{job_id}", headers=h)).json()) for h in (ADMIN, READ)]
    seen.append(json.dumps((await client.get("/v1/jobs", headers=ADMIN)).json()))
    seen += [p.read_text() for p in (root / "caches" / ".jobs" / "records").glob("*.json")]
    seen += [p.read_text() for p in (root / "caches" / "pets" / "versions").rglob("*.js*")]
    seen.append(caplog.text)
    assert "caption_api_key" not in seen[0] and all(SECRET not in text for text in seen)

    # explain: every support item is a neighbour here (explain_k 64); each says where it came from.
    body = (await client.post("/v1/classify", params={"cache": "pets", "explain": "true", "method": "tip"},
                              files=image_files(fashion_test, 1), headers=READ)).json()
    neighbors = body["results"][0]["neighbors"]
    items = store.load_cache(root / "caches" / "pets").items
    assert sorted(n["origin"] for n in neighbors) == ["real"] * 6 + ["synthetic"] * 6
    for n in neighbors:
        item = items[n["item"]]
        assert n["origin"] == item["origin"]
        if n["origin"] == "synthetic":
            assert n["prompt"] == item["prompt"] and n["prompt"].startswith(f"A photo of {n['label']}. ")
            assert n["generator"] == "tiny-sd"  # the model folder by its name, not its server path
        else:
            assert n["prompt"] is None and n["generator"] is None and n["caption"] == "a small animal on a rug"


async def test_hf_captioner_from_the_models_dir_and_a_rebuild_from_the_caption_cache(client, data, models):
    options = {**FAST, "captioner": "hf:blip"}
    first = await wait_job(client, (await post_build(client, "blipped", options, data)).json()["id"])
    assert first["state"] == "succeeded", first
    assert first["options"]["captioner"] == "hf:blip"  # as the request named it
    full = (await client.get(f"/v1/jobs/{first['id']}", headers=ADMIN)).json()
    assert full["report"]["captioner"]["model"] == str((models / "blip").resolve())
    assert first["report"]["captioner"]["model"] == "<server path>/blip"  # a read key sees no server layout
    assert first["report"]["captioner"]["cached"] == 0
    steps = [j["step"] for j in first["_seen"] if j["step"]]
    assert "synthesizing" not in steps

    again = await wait_job(client, (await post_build(client, "blipped", options, data)).json()["id"])
    assert again["state"] == "succeeded", again
    assert again["report"]["captioner"]["cached"] == 6  # nothing captioned again
