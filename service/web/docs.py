"""`/docs`: Swagger UI from files installed with the package (swagger-ui-bundle), so the
API reference works on a machine without internet; FastAPI's default loads it from a CDN.

Files come from a fixed table, never from a path in the URL."""
from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from kvclip.service.errors import HttpError

SWAGGER_DIR = Path(swagger_ui_bundle.swagger_ui_path)
ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8"}
ASSET_PREFIX = "/docs/assets"

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="kvclip API",
                               swagger_js_url=f"{ASSET_PREFIX}/swagger-ui-bundle.js",
                               swagger_css_url=f"{ASSET_PREFIX}/swagger-ui.css", swagger_favicon_url="/favicon.ico")


@router.get(ASSET_PREFIX + "/{name}")
async def swagger_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HttpError(404, "not_found", f"no documentation file {name!r}")
    return FileResponse(SWAGGER_DIR / name, media_type=ASSETS[name], headers={"Cache-Control": "max-age=86400"})
