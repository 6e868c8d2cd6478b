"""Fixtures shared by the e2e modules: one headless Chromium and one web server for the page's
tests (tests/e2e/test_web_page.py: one file, so one test process starts them), each started
once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.live_server import serve_in_thread
from tests.service_helpers import copy_caches

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
READ_KEY = "web-reader"


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return
    why = (f"{', '.join(missing)} missing: run `bash scripts/install_browser.sh` (Debian's chromium "
           "and chromium-driver) and `bash scripts/install.sh` (selenium)")
    if os.environ.get("KVCLIP_SKIP_BROWSER") == "1":
        pytest.skip(f"{why}; skipped because KVCLIP_SKIP_BROWSER=1")
    pytest.fail(f"{why}; or set KVCLIP_SKIP_BROWSER=1 to skip the browser tests on this machine",
                pytrace=False)


@pytest.fixture(scope="session")
def web_server(served_caches, tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("web")
    caches = copy_caches(served_caches, root / "caches")
    build_rendered_cache(caches / "rendered", root, tiny_encoder)
    with serve_in_thread(caches, root, keys={READ_KEY: "read"}, encoder=tiny_encoder) as srv:
        yield srv


def build_rendered_cache(out: Path, root: Path, encoder) -> None:
    """Labels only, 2 Stable Diffusion images per class (a tiny random pipeline): 4 synthetic items."""
    import torch

    from kvclip.cache_builder.build import BuildConfig, build_cache
    from tests.tiny_hf import save_tiny_stable_diffusion

    torch.manual_seed(0)
    sd = save_tiny_stable_diffusion(root / "models")
    build_cache(BuildConfig(out=out, labels=["cat", "dog"], model="tiny-random", views=1, captioner="none",
                            synthesize=2, support="synthetic", sd_model=str(sd), sd_steps=2, progress=False,
                            device="cpu"), encoder)


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    _require_browser()  # tests ask for `browser` before `web_server`: no browser fails in seconds
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # Root in a container: no sandbox; no GPU; /dev/shm may be tiny. Own profile directory,
    # so parallel runs on one machine never share one.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1000", f"--user-data-dir={root / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager is never run, so nothing is downloaded.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(root / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
