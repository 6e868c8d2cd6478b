"""Routes for the web page: `/` and its two static files, with no API key.

The page is static; its own API calls carry the key the user types in. Files are served
from a fixed table (never a path taken from the URL), each with a strict
Content-Security-Policy, so server-provided text can never run as script on the page.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from kvclip.service.errors import HttpError

STATIC = Path(__file__).resolve().parent / "static"
# name -> media type; the only files this router serves.
FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
         "favicon.svg": "image/svg+xml"}
# Only this origin: no inline script or style, no CDN; blob: for thumbnails of chosen files.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate (ETag), so an upgraded server serves its own page
}

router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.api_route("/favicon.ico", methods=["GET", "HEAD"])
async def favicon() -> FileResponse:
    """Browsers ask for /favicon.ico whatever the page links; an SVG answers it (no 404 in the log)."""
    return FileResponse(STATIC / "favicon.svg", media_type=FILES["favicon.svg"], headers=HEADERS)


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static_file(name: str) -> FileResponse:
    if name not in FILES:
        raise HttpError(404, "not_found", f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)
