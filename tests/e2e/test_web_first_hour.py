"""The web page's first-hour features: a method selector listing what the cache serves, a
model notice (a warning for random weights), nearest support examples with thumbnails
(GET /v1/caches/{name}/items/{i}/thumbnail), no caption column for a cache without
captions, bars that keep their width at 390 px, a favicon, and /docs without internet.

The browser tests use the same Chromium set-up as tests/e2e/test_web_page.py and save
screenshots at desktop and phone widths under the test's tmp folder."""
from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from tests.e2e.test_web_page import READ, READ_KEY, _by_testid, _open_with_key, _submit, _wait, first_image
from tests.service_helpers import make_config, running_app

# `browser` and `web_server` (tests/e2e/conftest.py): the same Chromium and server, API keys
# on, as the page's own tests.


@pytest.fixture
def sized(browser, width):
    """The browser at `width`, put back to its usual size for the next test (the session shares it)."""
    browser.set_window_size(width, 1000)
    yield browser
    browser.set_window_size(1200, 1000)


@pytest.mark.anyio
async def test_favicon_docs_and_support_thumbnails_in_process(served_caches, tmp_path, tiny_encoder, monkeypatch):
    monkeypatch.setenv("KVCLIP_API_KEYS", f"{READ_KEY}:read")
    async with running_app(make_config(served_caches), tiny_encoder) as (_, client):
        icon = await client.get("/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")

        docs = await client.get("/docs")
        assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text
        assert "cdn" not in docs.text.lower()  # nothing to fetch from the internet
        for asset, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "css")):
            response = await client.get(f"/docs/assets/{asset}")
            assert response.status_code == 200 and kind in response.headers["content-type"], asset
        assert (await client.get("/docs/assets/index.html")).status_code == 404

        path = "/v1/caches/fashion/items/0/thumbnail"
        assert (await client.get(path)).status_code == 401  # read scope
        thumb = await client.get(path, params={"size": 32}, headers=READ)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 32
        unknown = await client.get("/v1/caches/fashion/items/100000/thumbnail", headers=READ)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_item"


def _methods(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#method option")]


@pytest.mark.parametrize("width", [1200, 390])
def test_page_at_desktop_and_phone_width(sized, web_server, fashion_test, tmp_path, width):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser = sized
    _open_with_key(browser, web_server.url)
    served = {c["name"]: c for c in httpx.get(web_server.url + "/v1/caches", headers=READ, timeout=10).json()}

    # Method selector: auto plus exactly what the chosen cache serves.
    Select(browser.find_element(By.ID, "cache")).select_by_value("fashion-caps")
    assert _methods(browser) == ["auto", *served["fashion-caps"]["methods"]] and "caps" in _methods(browser)
    Select(browser.find_element(By.ID, "cache")).select_by_value("fashion")
    assert _methods(browser) == ["auto", *served["fashion"]["methods"]] and "caps" not in _methods(browser)

    notice = browser.find_element(By.ID, "model-notice")
    assert notice.is_displayed() and "tiny-random" in notice.text and "random weights" in notice.text
    assert notice.get_attribute("data-random") == "true"

    Select(browser.find_element(By.ID, "method")).select_by_value("tip")
    assert _submit(browser, [first_image(fashion_test)], top_k=3, explain=True) == "done"
    assert "(tip)" in browser.find_element(By.ID, "status").text  # the chosen method was asked for

    card = _by_testid(browser, "result")[0]
    # No captions in this cache: no caption column of dashes.
    headers = [th.text for th in card.find_elements(By.CSS_SELECTOR, ".neighbors th")]
    assert "Caption" not in headers and not _by_testid(card, "neighbor-caption")
    _wait(browser, lambda d: _by_testid(card, "neighbor-thumbnail"), "support thumbnails load")
    thumb = _by_testid(card, "neighbor-thumbnail")[0]
    _wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                              thumb), "a support thumbnail shows its image")

    # Layout facts: every bar's track is visible and inside the window; the top bar has width.
    viewport = browser.execute_script("return document.documentElement.clientWidth")
    tracks = card.find_elements(By.CSS_SELECTOR, ".track")
    assert tracks and all(t.size["width"] >= 24 for t in tracks), [t.size for t in tracks]
    assert all(t.location["x"] + t.size["width"] <= viewport for t in tracks)
    assert card.find_elements(By.CSS_SELECTOR, ".bar")[0].size["width"] > 0
    assert browser.execute_script("return document.documentElement.scrollWidth") <= viewport  # no sideways scroll
    browser.execute_script("arguments[0].scrollIntoView()", card)  # the screenshot shows the result
    browser.save_screenshot(str(tmp_path / f"page-{width}px.png"))
    assert (tmp_path / f"page-{width}px.png").stat().st_size > 0
