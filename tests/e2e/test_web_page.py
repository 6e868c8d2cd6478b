"""The web page at `/`: served in-process without an API key, and used in a real headless
Chromium (Debian's chromium and chromedriver, driven by Selenium) against a real server over
HTTP with API keys (the app under uvicorn in a thread of the test process), where what it
renders must match the API. Then the page's first-hour features: a method selector listing
what the cache serves, a model notice (a warning for random weights), nearest support examples
with thumbnails (GET /v1/caches/{name}/items/{i}/thumbnail), no caption column for a cache
without captions, bars that keep their width at 390 px, a favicon, and /docs without internet,
with screenshots at desktop and phone widths under the test's tmp folder. One file, so that one
test process starts the browser and the server (`browser`, `web_server`: tests/e2e/conftest.py).

The browser comes from `bash scripts/install_browser.sh` (.ci/run calls it). Without it
these browser tests fail, saying how to install it; set KVCLIP_SKIP_BROWSER=1 to skip them
on a machine that cannot have it.
"""
from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import READ_KEY
from tests.service_helpers import make_config, running_app

READ = {"Authorization": f"Bearer {READ_KEY}"}
WAIT_S = 30


# In-process: the page and its files are served, with no key, with the right types -------


@pytest.mark.anyio
async def test_page_and_static_files_need_no_key(tmp_path, tiny_encoder, monkeypatch):
    monkeypatch.setenv("KVCLIP_API_KEYS", f"{READ_KEY}:read")
    (tmp_path / "caches").mkdir()
    async with running_app(make_config(tmp_path / "caches"), tiny_encoder) as (_, client):
        assert (await client.get("/v1/caches")).status_code == 401  # keys are on

        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert 'src="/static/app.js"' in page.text and 'href="/static/style.css"' in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"

        script = await client.get("/static/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "/v1/classify" in script.text
        style = await client.get("/static/style.css")
        assert style.status_code == 200 and style.headers["content-type"] == "text/css; charset=utf-8"

        for path in ("/static/index.html", "/static/..%2Frouter.py", "/static/nope.js"):
            missing = await client.get(path)
            assert missing.status_code == 404, path
            assert missing.json()["error"]["code"] == "not_found"
        assert "/" not in (await client.get("/openapi.json")).json()["paths"]


def test_page_never_parses_server_text_as_html():
    # Labels, captions and names come from whoever built the cache: text only, never markup.
    script = (Path(__file__).resolve().parents[2] / "service/web/static/app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


# In a real browser -----------------------------------------------------------------------


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, message=what)


def _by_testid(root, testid: str) -> list:
    from selenium.webdriver.common.by import By

    return root.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def _open_with_key(driver, url: str) -> None:
    """Open the page, see the 401 it shows without a key, enter the key, see the caches."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    box = driver.find_element(By.ID, "caches-error")
    _wait(driver, lambda d: box.is_displayed() and box.get_attribute("data-status") == "401",
          "the caches list shows 401 without a key")
    assert "unauthorized" in box.text and "API key" in box.text
    key = driver.find_element(By.ID, "api-key")
    key.send_keys(READ_KEY + Keys.TAB)  # change event: kept in localStorage, caches reloaded
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, '#cache option[value="fashion"]'),
          "the cache list is filled once the key is given")
    assert not box.is_displayed()


def first_image(folder: Path) -> Path:
    return min(folder.rglob("*.png"), key=lambda p: p.name)


def _submit(driver, files: list[Path], *, top_k: int, explain: bool, cache: str = "fashion") -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "cache")).select_by_value(cache)
    top = driver.find_element(By.ID, "top-k")
    top.clear()
    top.send_keys(str(top_k))
    box = driver.find_element(By.ID, "explain")
    if box.is_selected() != explain:
        box.click()
    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in files))
    driver.find_element(By.ID, "submit").click()
    results = driver.find_element(By.ID, "results")
    _wait(driver, lambda d: results.get_attribute("data-state") in ("done", "failed"),
          "the classify request finishes")
    return results.get_attribute("data-state")


def test_page_renders_what_the_api_answers(browser, web_server, fashion_test, tmp_path):
    from selenium.webdriver.common.by import By

    good = first_image(fashion_test)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    # The browser types this text/plain; the page sends every file as octet-stream, so the
    # server tries to decode it and reports it as this one image's error.
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image either")
    api = httpx.post(web_server.url + "/v1/classify", params={"cache": "fashion", "top_k": 3, "explain": "true"},
                     files=[("file", (good.name, good.read_bytes(), "image/png"))], headers=READ, timeout=30)
    assert api.status_code == 200, api.text
    expected = api.json()["results"][0]

    _open_with_key(browser, web_server.url)
    option = browser.find_element(By.CSS_SELECTOR, '#cache option[value="fashion"]')
    assert "10 labels" in option.text and "v0001" in option.text
    assert _submit(browser, [good, broken, notes], top_k=3, explain=True) == "done"

    cards = _by_testid(browser, "result")
    assert [c.get_attribute("data-index") for c in cards] == ["0", "1", "2"]  # request order
    ok, bad, text = cards
    assert [c.get_attribute("data-status") for c in cards] == ["ok", "error", "error"]

    # The good image: same top-1 label and labels as the API, percentages to one decimal.
    assert _by_testid(ok, "top1-label")[0].text == expected["labels"][0]["label"]
    rows = _by_testid(ok, "label-row")
    assert [r.get_attribute("data-label") for r in rows] == [lb["label"] for lb in expected["labels"]]
    assert _by_testid(ok, "top1-percent")[0].text == f"{expected['labels'][0]['score'] * 100:.1f}%"
    assert good.name in _by_testid(ok, "result-name")[0].text
    thumb = _by_testid(ok, "thumbnail")[0]
    _wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                              thumb), "the thumbnail shows the chosen file")

    # explain: one row per neighbour the API returns, same labels in the same order.
    neighbors = _by_testid(ok, "neighbor")
    assert len(neighbors) == len(expected["neighbors"]) > 0
    assert [_by_testid(n, "neighbor-label")[0].text for n in neighbors] == \
        [n["label"] for n in expected["neighbors"]]
    origins = [_by_testid(n, "neighbor-origin")[0] for n in neighbors]  # real or synthetic, as the API says
    assert [o.get_attribute("data-origin") for o in origins] == [n["origin"] for n in expected["neighbors"]]
    assert [o.text for o in origins] == [n["origin"] for n in expected["neighbors"]]

    # The undecodable files: error cards next to the good result, not instead of it.
    for card, path in ((bad, broken), (text, notes)):
        assert "bad_image" in _by_testid(card, "image-error")[0].text
        assert path.name in _by_testid(card, "result-name")[0].text
        assert not _by_testid(card, "top1-label")
    assert not browser.find_element(By.ID, "request-error").is_displayed()
    assert "1 of 3 classified" in browser.find_element(By.ID, "status").text

    # The page's own code keeps to its Content-Security-Policy (no inline script or style).
    logs = browser.get_log("browser")
    assert not [e for e in logs if "Content Security Policy" in e["message"]], logs

    # The key survives a reload (localStorage) and the caches load with it.
    browser.refresh()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#cache option[value="fashion"]'),
          "caches load with the stored key")
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == READ_KEY


def test_page_shows_where_each_neighbour_came_from(browser, web_server, fashion_test):
    good = first_image(fashion_test)
    api = httpx.post(web_server.url + "/v1/classify", params={"cache": "rendered", "explain": "true"},
                     files=[("file", (good.name, good.read_bytes(), "image/png"))], headers=READ, timeout=30)
    assert api.status_code == 200, api.text
    expected = api.json()["results"][0]["neighbors"]
    assert len(expected) == 4 and {n["origin"] for n in expected} == {"synthetic"}

    _open_with_key(browser, web_server.url)
    assert _submit(browser, [good], top_k=2, explain=True, cache="rendered") == "done"
    rows = _by_testid(_by_testid(browser, "result")[0], "neighbor")
    origins = [_by_testid(row, "neighbor-origin")[0] for row in rows]
    assert [o.get_attribute("data-origin") for o in origins] == ["synthetic"] * 4
    # the generator by its folder's name, the prompt on hover and in the caption column
    assert [_by_testid(o, "neighbor-generator")[0].text for o in origins] == [n["generator"] for n in expected]
    assert expected[0]["generator"] == "sd"
    assert [o.get_attribute("title") for o in origins] == [f"prompt: {n['prompt']}" for n in expected]
    assert [_by_testid(row, "neighbor-caption")[0].text for row in rows] == [n["prompt"] for n in expected]


def test_page_shows_a_refused_request(browser, web_server, fashion_test):
    from selenium.webdriver.common.by import By

    _open_with_key(browser, web_server.url)
    # The key goes bad after the caches were listed: the classify request itself gets 401.
    browser.execute_script("document.getElementById('api-key').value = 'not-a-key'")
    good = first_image(fashion_test)
    assert _submit(browser, [good], top_k=2, explain=False) == "failed"
    box = browser.find_element(By.ID, "request-error")
    assert box.is_displayed() and box.get_attribute("data-status") == "401"
    assert "401 unauthorized" in _by_testid(box, "error-code")[0].text
    assert "not valid" in _by_testid(box, "error-message")[0].text
    assert not _by_testid(browser, "result")


def test_drop_zone_takes_dropped_files(browser, web_server):
    from selenium.webdriver.common.by import By

    _open_with_key(browser, web_server.url)
    # What a drag from the desktop delivers: a drop event whose DataTransfer holds files.
    browser.execute_script("""
        const data = new DataTransfer();
        for (const name of ['a.png', 'b <i>.jpg']) data.items.add(new File(['x'], name, {type: 'image/png'}));
        document.getElementById('drop-zone').dispatchEvent(
            new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
    """)
    listing = browser.find_element(By.ID, "file-list")
    assert listing.text == "2 images: a.png, b <i>.jpg"  # names shown as text, not markup
    assert not listing.find_elements(By.TAG_NAME, "i")


# First-hour features -------------------------------------------------------------------


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
