"""`kvclip serve` in-process, up to where it would listen: settings and model refusals.

The command as a real process (uvicorn, sockets, SIGTERM): tests/e2e/test_service_uvicorn.py.
"""
from __future__ import annotations

import pytest

import kvclip.models
from kvclip.service.middleware import ConcurrencyLimitMiddleware
from tests.hash_counting import count_hashes
from tests.service_helpers import run_serve


def test_model_without_weights_is_refused_before_any_model_is_made(monkeypatch, capsys, tmp_path):
    made = []
    monkeypatch.setattr(kvclip.models, "_create_model", lambda *a, **k: made.append(a))
    # --caches from the environment, --model as a flag naming an architecture only
    code, err, served = run_serve(monkeypatch, capsys, "--model", "ViT-B-32", "--device", "cpu",
                                  env={"KVCLIP_CACHES": str(tmp_path / "nowhere")})
    assert code == 2, err
    assert "names no weights" in err and "ViT-B-32:openai" in err  # says how to name the weights
    assert "the following arguments are required" not in err  # KVCLIP_CACHES stood in for --caches
    assert "Traceback" not in err
    assert made == [] and served is None  # no model was made, nothing listened


def test_missing_required_settings_is_a_usage_error(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_serve(monkeypatch, capsys)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    required = next(line for line in err.splitlines() if "the following arguments are required" in line)
    assert "--caches" in required and "--model" in required
    assert "Traceback" not in err


def test_a_loadable_model_reaches_uvicorn_with_the_configured_server(monkeypatch, capsys, tmp_path):
    code, err, served = run_serve(monkeypatch, capsys, "--caches", str(tmp_path), "--model", "tiny-random",
                                  "--device", "cpu", "--port", "8123", env={"KVCLIP_MAX_CONCURRENCY": "7"})
    assert code == 0, err
    assert served.port == 8123
    # --max-concurrency is the app's JSON-503 middleware, not uvicorn's text-503 limit
    assert served.limit_concurrency is None
    limits = [m.kwargs["limit"] for m in served.app.user_middleware if m.cls is ConcurrencyLimitMiddleware]
    assert limits == [7]
    assert served.timeout_graceful_shutdown > 0


def test_the_start_up_heap_is_frozen_before_serving(monkeypatch, capsys, tmp_path):
    """What start-up imported and loaded is out of the collector's reach once the server
    listens: a full collection would otherwise scan it all while requests wait."""
    import gc

    frozen = []
    real_freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (real_freeze(), frozen.append(gc.get_freeze_count())))
    code, err, _ = run_serve(monkeypatch, capsys, "--caches", str(tmp_path), "--model", "tiny-random", "--device", "cpu")
    assert code == 0, err
    assert len(frozen) == 1 and frozen[0] > 100_000  # torch, open_clip, the app and the model
    assert gc.get_freeze_count() == 0  # run_serve thawed this test process again


def test_idle_connections_outlive_client_pools_and_the_flag_reaches_uvicorn(monkeypatch, capsys, tmp_path):
    import httpx

    args = ("--caches", str(tmp_path), "--model", "tiny-random", "--device", "cpu")
    code, err, served = run_serve(monkeypatch, capsys, *args)
    assert code == 0, err
    # The client must drop an idle connection before the server does (docs/server.md).
    assert served.timeout_keep_alive > httpx.Limits().keepalive_expiry
    code, err, served = run_serve(monkeypatch, capsys, *args, env={"KVCLIP_KEEP_ALIVE_TIMEOUT_S": "12.5"})
    assert code == 0, err
    assert served.timeout_keep_alive == 12.5


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_keep_alive_timeout_is_refused_by_name(monkeypatch, capsys, tmp_path, value):
    code, err, served = run_serve(monkeypatch, capsys, "--caches", str(tmp_path), "--model", "tiny-random",
                                  "--keep-alive-timeout-s", value)
    assert code == 2 and served is None
    assert "keep_alive_timeout_s" in err and "Traceback" not in err


def test_the_checkpoint_is_hashed_once_across_serve_commands(monkeypatch, capsys, tmp_path, tiny_encoder):
    import torch

    import kvclip.digests

    hashed = count_hashes(monkeypatch)
    monkeypatch.setattr(kvclip.digests, "RACY_S", 0.0)  # the checkpoint was written a moment ago
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.model.state_dict(), checkpoint)
    args = ("--caches", str(tmp_path), "--model", f"kvclip-tiny:{checkpoint}", "--device", "cpu")
    for _ in range(2):
        code, err, _served = run_serve(monkeypatch, capsys, *args)
        assert code == 0, err
    assert hashed == {"tiny.pt": 1} and (tmp_path / ".digests.json").is_file()
    code, err, _served = run_serve(monkeypatch, capsys, *args, env={"KVCLIP_VERIFY_FILES": "full"})
    assert code == 0, err
    assert hashed == {"tiny.pt": 2}


def test_an_unknown_verify_mode_is_refused_by_name(monkeypatch, capsys, tmp_path):
    code, err, served = run_serve(monkeypatch, capsys, "--caches", str(tmp_path), "--model", "tiny-random",
                                  env={"KVCLIP_VERIFY_FILES": "sometimes"})
    assert code == 2 and served is None
    assert "verify_files" in err and "changed, full" in err and "Traceback" not in err
