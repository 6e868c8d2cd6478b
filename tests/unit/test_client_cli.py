"""`kvclip caches build` and `kvclip jobs` on a fake server: following a job, its output,
failures and interrupts as one line. (The commands against a real server, and a real
build, are in tests/e2e/test_client_server.py.)"""
from __future__ import annotations

import functools
import json

import httpx
import numpy as np
import pytest

import kvclip.clients.cli
from kvclip.clients import KvclipClient
from tests.client_fakes import Recorder, build_script, job_json, multipart, png_bytes, run_cli


@pytest.fixture
def fake_server(monkeypatch):
    """Point the CLI's client at a scripted fake; returns a function that sets the script."""
    monkeypatch.setenv("KVCLIP_API_KEY", "boss")
    state: dict = {}

    def script(handler: Recorder, sleep=lambda seconds: None) -> Recorder:
        monkeypatch.setattr(kvclip.clients.cli, "KvclipClient", functools.partial(
            KvclipClient, transport=httpx.MockTransport(handler), sleep=sleep))
        state["handler"] = handler
        return handler

    return script


@pytest.fixture
def data(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        (tmp_path / "data" / label / "a.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    return tmp_path / "data"


def test_build_follows_the_job(fake_server, capsys, data):
    handler = fake_server(build_script(
        job_json("queued"), job_json("running", step="encoding", done=1, total=2),
        job_json("running", step="encoding", done=2, total=2),
        job_json("succeeded", step="publishing", done=1, total=1, version="v0004", elapsed_s=3.2)))
    code, out, err = run_cli(capsys, "caches", "build", "pets", "--data", str(data), "--shots", "all",
                             "--views", "2", "--captioner", "none", "--seed", "3", "--no-activate")
    assert code == 0, err
    assert out.splitlines() == ["job ab12: cache pets, succeeded, 3s elapsed", "version v0004 (not activated)"]
    assert err.splitlines() == ["job ab12 queued: queued", "job ab12 running: encoding 1/2",
                                "job ab12 succeeded: publishing 1/1"]
    fields, files = multipart(handler.requests[0])
    assert json.loads(fields["options"]) == {"shots": "all", "views": 2, "captioner": "none", "seed": 3,
                                             "activate": False}
    assert handler.requests[0].headers["authorization"] == "Bearer boss"
    assert [f for f, _, _ in files] == ["data"]


def test_build_json_and_no_wait(fake_server, capsys, tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    handler = fake_server(build_script(job_json("queued")))
    code, out, err = run_cli(capsys, "caches", "build", "pets", "--labels", str(tmp_path / "labels.txt"),
                             "--no-wait", "--json")
    assert code == 0 and err == "" and json.loads(out)["state"] == "queued" and len(handler.requests) == 1
    assert json.loads(handler.requests[0].content) == {"labels": ["cat", "dog"], "activate": True}


def test_build_failure_is_one_line(fake_server, capsys, data):
    fake_server(build_script(job_json("running", step="reading"),
                             job_json("failed", error="missing caption for cat/a.png (cat/a.txt)")))
    code, out, err = run_cli(capsys, "caches", "build", "pets", "--data", str(data), "--quiet")
    assert code == 1 and out == ""
    assert err.splitlines() == ["kvclip: error: build of cache 'pets' failed (job ab12): "
                                "missing caption for cat/a.png (cat/a.txt)"]


def test_build_interrupted_says_the_job_goes_on(fake_server, capsys, data):
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    fake_server(build_script(job_json("running")), sleep=interrupt)
    code, _, err = run_cli(capsys, "caches", "build", "pets", "--data", str(data), "--quiet")
    assert code == 130
    assert err.splitlines()[-1] == ("kvclip: interrupted; job ab12 goes on on the server "
                                    "(`kvclip jobs cancel ab12` stops it)")


def test_jobs_commands(fake_server, capsys):
    handler = fake_server(Recorder(
        httpx.Response(200, json={"jobs": [job_json("running", step="tuning", done=1, total=3),
                                           job_json("failed", id="cd", error="boom")]}),
        httpx.Response(200, json=job_json("running", step="tuning", done=2, total=3)),
        httpx.Response(202, json=job_json("running"))))
    code, out, _ = run_cli(capsys, "jobs", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["job", "cache", "state", "step", "done", "elapsed", "version", "error"]
    assert lines[1].split() == ["ab12", "pets", "running", "tuning", "1/3", "0s"]
    assert lines[2].split()[:3] == ["cd", "pets", "failed"] and lines[2].endswith("boom")
    code, out, _ = run_cli(capsys, "jobs", "show", "ab12")
    assert out.strip() == "job ab12: cache pets, running at tuning 2/3, 0s elapsed"
    code, out, _ = run_cli(capsys, "jobs", "cancel", "ab12", "--json")
    assert json.loads(out)["id"] == "ab12"
    assert [(r.method, r.url.path) for r in handler.requests] == [
        ("GET", "/v1/jobs"), ("GET", "/v1/jobs/ab12"), ("DELETE", "/v1/jobs/ab12")]


def test_api_key_file_problems(capsys, tmp_path):
    """A usage problem (exit status 2), not a server error (1)."""
    code, _, err = run_cli(capsys, "caches", "list", "--api-key-file", str(tmp_path / "none"))
    assert code == 2 and err.startswith("kvclip: error: cannot read API key file")
    (tmp_path / "empty").write_text("\n")
    code, _, err = run_cli(capsys, "caches", "list", "--api-key-file", str(tmp_path / "empty"))
    assert code == 2 and err.strip().endswith("is empty")


def test_build_sends_the_generative_options_and_the_caption_key_from_a_file(fake_server, capsys, data, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-the-environment")
    (tmp_path / "caption.key").write_text("\nsk-from-the-file\n")
    handler = fake_server(build_script(job_json("queued")))
    code, _, err = run_cli(capsys, "caches", "build", "pets", "--data", str(data), "--no-wait",
                           "--captioner", "openai:http://vlm.internal:8000/v1", "--captioner-model", "llava",
                           "--caption-prompt", "One sentence.", "--caption-concurrency", "2",
                           "--caption-api-key-file", str(tmp_path / "caption.key"), "--synthesize", "4",
                           "--sd-model", "sd-v1-4", "--guidance", "7.5", "--steps", "30", "--support", "synthetic")
    assert code == 0, err
    fields, _ = multipart(handler.requests[0])
    assert json.loads(fields["options"]) == {
        "captioner": "openai:http://vlm.internal:8000/v1", "captioner_model": "llava", "caption_prompt": "One sentence.",
        "caption_concurrency": 2, "caption_api_key": "sk-from-the-file", "synthesize": 4, "sd_model": "sd-v1-4",
        "guidance": 7.5, "steps": 30, "support": "synthetic", "activate": True}
    # Without a key file an openai: build sends $OPENAI_API_KEY; another captioner sends no key.
    for captioner, key in (("openai:https://api.example.org/v1", "from-the-environment"), ("hf:blip", None)):
        handler = fake_server(build_script(job_json("queued")))
        assert run_cli(capsys, "caches", "build", "pets", "--data", str(data), "--no-wait",
                       "--captioner", captioner)[0] == 0
        assert json.loads(multipart(handler.requests[0])[0]["options"]).get("caption_api_key") == key


@pytest.mark.parametrize("captioner", ["hf:", "openai:ftp://x/v1", "blip"])
def test_build_refuses_a_bad_captioner_before_any_request(fake_server, capsys, data, captioner):
    handler = fake_server(build_script(job_json("queued")))
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "caches", "build", "pets", "--data", str(data), "--captioner", captioner)
    assert exit_.value.code == 2 and "--captioner" in capsys.readouterr().err and handler.requests == []
