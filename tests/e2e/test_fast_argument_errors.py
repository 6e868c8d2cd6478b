"""Argument errors are found before torch and open_clip are imported (which takes seconds):
the commands below run one after another in a fresh interpreter, which reports for each,
after `kvclip` returned, its exit status, its stderr and whether torch had been imported by
then. No timing: the import itself is the check."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_images

PROBE = """
import contextlib, io, json, sys
from kvclip.cli import main
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    print(json.dumps({"code": code, "stderr": err.getvalue(), "torch": "torch" in sys.modules,
                      "open_clip": "open_clip" in sys.modules}))
"""


def kvclip_probe(argvs: list[list[str]]) -> list[dict]:
    """Each argv's result, in order, from one fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("args") / "data"
    write_images(root / "cat", 2)
    write_images(root / "dog", 2, seed=1)
    return root


def cases(data: Path) -> list[tuple[list[str], str]]:
    out = str(data.parent / "caches" / "pets")
    build = ["build", str(data), "--out", out]
    return [
        (["build", str(data.parent / "missing"), "--out", out], "no such folder"),
        ([*build, "--shots", "0"], "--shots must be a positive integer"),
        ([*build, "--views", "0"], "--views must be at least 1"),
        ([*build, "--model", "ViT-B-33:openai"], "unknown open_clip architecture 'ViT-B-33'"),
        ([*build, "--model", "ViT-B-32"], "names no weights"),
        ([*build, "--model", "ViT-B-32:/no/such/file.pt"], "no checkpoint file"),
        ([*build, "--captioner", "sidecar"], "no caption for"),
        ([*build, "--labels", str(data / "labels.txt")], "--labels"),
        ([*build, "--synthesize", "-1"], "--synthesize must be 0 to 1000"),
        ([*build, "--synthesize", "1001"], "--synthesize must be 0 to 1000"),
        ([*build, "--support", "synthetic"], "--support synthetic needs --synthesize"),
        ([*build, "--synthesize", "2", "--support", "real"], "--support real uses no rendered images"),
        ([*build, "--synthesize", "2", "--steps", "0"], "--steps must be at least 1"),
        ([*build, "--synthesize", "2", "--guidance", "-1"], "--guidance must be 0 to 100"),
        (["build", "--data", str(data), "--out", str(data.parent / "bad name")], "cache name"),
        (["eval", "--cache", out], "no such folder"),
        (["eval", "--cache", str(data), "--limit", "0"], "one of them"),
        (["export-dataset", "fashion-mnist", "--out", str(data.parent / "x"), "--per-class", "0"],
         "--per-class must be at least 1"),
        (["serve", "--caches", str(data), "--model", "nope:openai"], "unknown open_clip architecture"),
        (["serve", "--caches", str(data.parent / "missing"), "--model", "tiny-random"], "no such folder"),
    ]


def test_argument_errors_exit_2_before_torch_is_imported(data):
    argvs, messages = zip(*cases(data))
    results = kvclip_probe(list(argvs))
    assert len(results) == len(argvs)
    for argv, message, result in zip(argvs, messages, results):
        stderr = result["stderr"]
        assert result["code"] == 2, (argv, stderr)
        assert message in stderr, (argv, stderr)
        assert stderr.count("\n") == 1 and "Traceback" not in stderr, (argv, stderr)
        assert not result["torch"] and not result["open_clip"], (argv, "imported torch before the error")
