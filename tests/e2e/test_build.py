"""`kvclip build` as a process: what only a process shows (start-up, exit code, stderr).

Everything else about the command runs in-process: tests/integration/test_build_cli.py.
"""
import subprocess

from tests.server_process import REPO, base_env, kvclip_cmd


def test_a_refused_build_exits_2_with_one_line_on_stderr(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(kvclip_cmd("build", str(tmp_path / "empty"), "--out", str(tmp_path / "c"),
                                     "--model", "tiny-random"),
                          cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()  # no traceback, no log noise
    assert line.startswith(f"kvclip: error: data folder {tmp_path / 'empty'} holds no images"), line
    assert proc.stdout == "" and not (tmp_path / "c").exists()
