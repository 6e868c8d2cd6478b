"""A support item's image as a small thumbnail (read scope), for the web page's "nearest
support examples". The item's path is the one its cache recorded at build time (never a
path from the URL); an item whose file is gone (an HTTP build's upload is deleted when the
job ends) answers 404 `image_unavailable`."""
from __future__ import annotations

import asyncio
import io
from pathlib import Path

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam
from fastapi.responses import Response

from kvclip.errors import ImageDecodeError
from kvclip.images import load_image
from kvclip.service.api_caches import CacheName
from kvclip.service.deps import ready_state, require
from kvclip.service.errors import HttpError, error_responses
from kvclip.service.state import ServerState

router = APIRouter(prefix="/v1/caches", tags=["caches"])
MAX_THUMBNAIL = 512


def thumbnail_png(path: Path, size: int) -> bytes:
    """The image at `path`, fit into size x size, as PNG; HttpError 404 when it cannot be read."""
    try:
        image = load_image(path)
    except (ImageDecodeError, OSError) as exc:
        raise HttpError(404, "image_unavailable", "this support item's image is no longer readable on the "
                        "server (an uploaded build's images are not kept)") from exc
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()


@router.get("/{name}/items/{item}/thumbnail", dependencies=[require("read")], response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the support image, at most size px"},
                       **error_responses(401, 403, 404, 422, 503, described={
                           404: "unknown cache or item, or the item's image is no longer on the server"})})
async def item_thumbnail(name: str = CacheName, item: int = PathParam(ge=0, description="support item index"),
                         size: int = Query(128, ge=16, le=MAX_THUMBNAIL, description="longest side in px"),
                         state: ServerState = Depends(ready_state)) -> Response:
    items = state.registry.get(name).artifact.items
    if item >= len(items):
        raise HttpError(404, "unknown_item", f"cache {name!r} has {len(items)} support items; no item {item}")
    png = await asyncio.to_thread(thumbnail_png, Path(items[item]["path"]), size)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})
