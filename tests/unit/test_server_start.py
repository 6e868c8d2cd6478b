"""`kvclip serve` start-up: argument checks before the model loads, clean JSON logs."""
from __future__ import annotations

import json
import logging

import pytest

from kvclip.service import logs
from tests.client_fakes import run_cli


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    faiss_level = logging.getLogger("faiss.loader").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("faiss.loader").setLevel(faiss_level)


def test_a_missing_caches_folder_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model must not load for a command that cannot run")

    monkeypatch.setattr("kvclip.models.load_encoder", no_model)
    missing = tmp_path / "no-such-caches"
    code, _, err = run_cli(capsys, "serve", "--caches", str(missing), "--model", "tiny-random")
    assert code == 2
    assert f"--caches {missing}: no such folder" in err and "mkdir -p" in err
    assert not missing.exists()


def test_json_logs_carry_no_terminal_colour_codes():
    # What uvicorn logs: the message plus a copy with ANSI colours for its own formatter. The
    # formatter is checked on the record itself: other tests' threads may log meanwhile.
    record = logging.getLogger("uvicorn.error").makeRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (42,), None,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"})
    line = logs.JsonFormatter().format(record)
    parsed = json.loads(line)
    assert parsed["message"] == "Started server process [42]"
    assert "color_message" not in parsed and "\x1b" not in line


def test_faiss_loader_chatter_is_not_logged_at_info(capsys, restore_logging):
    logs.configure("text", "INFO")
    logging.getLogger("faiss.loader").info("Could not load library with AVX512 support due to: ...")
    logging.getLogger("faiss.loader").warning("a real faiss problem")
    err = capsys.readouterr().err
    assert "AVX512" not in err and "a real faiss problem" in err
