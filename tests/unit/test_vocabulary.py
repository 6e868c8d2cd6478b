"""kvclip/vocabulary.py and kvclip/extras.py: one torch-free source of names, defaults, limits and
the version, and the `kvclip` parser that the light (client-only) install can build."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

from kvclip import __version__, cli, extras, vocabulary
from kvclip.cache_builder.build import BuildConfig
from kvclip.images import DEFAULT_MAX_PIXELS
from kvclip.service.config import ServerConfig
from kvclip.service.schemas import ActivateRequest, BuildOptions, ClassifyParams

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "open_clip", "faiss", "numpy", "PIL", "fastapi", "uvicorn", "pydantic")


def run_python(code: str, *flags: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_vocabulary_and_extras_import_only_the_standard_library():
    # -S: no site-packages at all, so a third-party import would fail here, not just be counted.
    code = ("import sys; import kvclip.vocabulary, kvclip.extras; "
            "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'__main__'}))")
    done = run_python(code, "-S", PYTHONPATH=str(REPO))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['kvclip']"


def test_the_kvclip_parser_imports_no_torch_faiss_or_fastapi():
    code = ("import sys; from kvclip.cli import build_parser; build_parser(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version_is_pyproject_s_read_from_metadata(capsys):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert vocabulary.VERSION == __version__ == metadata.version("kvclip") == pyproject["project"]["version"]
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"kvclip {vocabulary.VERSION}"


def test_version_falls_back_when_kvclip_is_not_installed(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert vocabulary.package_version() == vocabulary.UNKNOWN_VERSION


def test_method_tuples_and_http_literals_agree():
    assert vocabulary.REQUEST_METHODS == (vocabulary.AUTO_METHOD, *vocabulary.METHODS)
    assert set(vocabulary.CACHE_METHODS) == set(vocabulary.METHODS) - {vocabulary.ZEROSHOT_METHOD}
    for method in vocabulary.REQUEST_METHODS:
        assert ClassifyParams(cache="c", method=method).method == method
    with pytest.raises(ValueError):
        ClassifyParams(cache="c", method="tip-x")
    for captioner in vocabulary.CAPTIONERS:
        assert BuildOptions(captioner=captioner).captioner == captioner
    with pytest.raises(ValueError):
        BuildOptions(captioner="blip")


@pytest.mark.parametrize("name, ok", [("pets", True), ("a.b_c-1", True), ("x" * 128, True), ("x" * 129, False),
                                      (".hidden", False), ("a/b", False), ("", False)])
def test_cache_name_pattern(name, ok):
    assert bool(vocabulary.CACHE_NAME_RE.match(name)) is ok


@pytest.mark.parametrize("number, name", [(1, "v0001"), (42, "v0042"), (12345, "v12345")])
def test_version_names_match_the_version_pattern(number, name):
    assert vocabulary.version_name(number) == name
    assert vocabulary.VERSION_RE.match(name)
    assert ActivateRequest(version=name).version == name
    with pytest.raises(ValueError):
        ActivateRequest(version="v001")


def test_every_front_end_starts_from_the_same_build_defaults():
    v = vocabulary
    http = BuildOptions()
    assert (http.shots, http.views, http.captioner, http.seed, http.pool_per_class) == (
        v.DEFAULT_SHOTS, v.DEFAULT_VIEWS, v.DEFAULT_CAPTIONER, v.DEFAULT_SEED, v.DEFAULT_POOL_PER_CLASS)
    config = BuildConfig(out=Path("x"))
    assert (config.model, config.shots, config.views, config.captioner, config.seed, config.pool_per_class,
            config.batch_size, config.index_kind, config.faiss_k) == (
        v.DEFAULT_MODEL, v.DEFAULT_SHOTS, v.DEFAULT_VIEWS, v.DEFAULT_CAPTIONER, v.DEFAULT_SEED,
        v.DEFAULT_POOL_PER_CLASS, v.DEFAULT_BUILD_BATCH_SIZE, v.DEFAULT_INDEX_KIND, v.DEFAULT_FAISS_K)
    args = cli.build_parser().parse_args(["build", "data", "--out", "c"])
    assert (args.model, int(args.shots), args.views, args.captioner, args.seed, args.pool_per_class,
            args.batch_size, args.index, args.faiss_k) == (
        v.DEFAULT_MODEL, v.DEFAULT_SHOTS, v.DEFAULT_VIEWS, v.DEFAULT_CAPTIONER, v.DEFAULT_SEED,
        v.DEFAULT_POOL_PER_CLASS, v.DEFAULT_BUILD_BATCH_SIZE, v.DEFAULT_INDEX_KIND, v.DEFAULT_FAISS_K)
    assert ClassifyParams(cache="c").top_k == v.DEFAULT_TOP_K


def test_one_pixel_limit_for_builder_and_server():
    assert DEFAULT_MAX_PIXELS == ServerConfig(caches=Path("c"), model="m").max_pixels == vocabulary.MAX_PIXELS


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_extra_modules_are_the_server_extra_of_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = {_normalise(re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0])
                for req in pyproject["project"]["optional-dependencies"][extras.SERVER]}
    distributions = metadata.packages_distributions()
    named = {_normalise(dist) for module in extras.EXTRA_MODULES[extras.SERVER] for dist in distributions[module]}
    assert named == declared


def test_a_server_command_without_the_extra_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    real = extras.importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "faiss") else real(name, *a))
    assert cli.main(["build", "--labels", str(tmp_path / "labels.txt"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "missing: torch, faiss" in err and "pip install 'kvclip[server]'" in err
    assert not (tmp_path / "c").exists()
    assert cli.main(["serve", "--caches", str(tmp_path), "--model", "tiny-random"]) == 2
    assert "`kvclip serve` needs the server extra" in capsys.readouterr().err
