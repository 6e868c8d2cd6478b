"""The body of POST /v1/classify -> the images it carries and its parameters, within the limits.

A multipart form (files in order, other fields as parameters) or a JSON body (base64
images, parameters beside them); parameters in the body override the query string. Used
by the plain server's route and by the Ray Serve ingress alike.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from kvclip.service.config import ServerConfig
from kvclip.service.errors import HttpError, invalid
from kvclip.service.pixels import RequestImage
from kvclip.service.schemas import ClassifyJson, ClassifyParams


@dataclass
class ClassifyRequest:
    images: list[RequestImage]
    params: ClassifyParams


async def read_classify_request(request: Request, query: dict, config: ServerConfig) -> ClassifyRequest:
    """Parse the body, merge its parameters over `query` (None: not given) and check the
    image count and sizes; HttpError for a body that breaks any of that."""
    images, body_params = await _read_body(request, config)
    parsed = ClassifyRequest(images, merge_params(query, body_params))
    check_images(parsed.images, config, parsed.params.partial)
    return parsed


def parse_json(raw: str | bytes, what: str) -> object:
    """json.loads for request bodies: HttpError 400 for text that is not JSON, not UTF-8, or
    nested too deeply for the parser (RecursionError, from about 1000 levels: a 2 KB body)."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise HttpError(400, "bad_json", f"{what}: JSON nested too deeply to parse") from exc
    except ValueError as exc:  # JSONDecodeError, and bytes that are not UTF-8 text
        raise HttpError(400, "bad_json", f"{what}: not valid JSON: {exc}") from exc


def merge_params(query: dict, body: dict) -> ClassifyParams:
    merged = {k: v for k, v in query.items() if v is not None} | body
    try:
        return ClassifyParams.model_validate(merged)
    except ValidationError as exc:
        raise invalid("invalid parameters", exc) from exc


def check_images(images: list[RequestImage], config: ServerConfig, partial: bool) -> None:
    """The image count, and each image's size and form. Without `partial` an unusable image fails
    the request before any decoding (413 too large, 415 not an image, 400 bad base64); with it,
    each is reported in its own result."""
    if not images:
        raise HttpError(422, "no_images", "the request carries no images")
    if len(images) > config.max_images:
        raise HttpError(413, "too_many_images",
                        f"{len(images)} images in one request; the limit is {config.max_images}")
    limit = config.max_image_bytes
    for image in images:
        if len(image.data) > limit:
            image.data, image.refused, image.code = b"", f"more than {limit} bytes", "image_too_large"
    if partial:
        return
    for code, status in (("image_too_large", 413), ("unsupported_media_type", 415), ("bad_image", 400)):
        bad = [i for i in images if i.refused and i.code == code]
        if bad:
            raise HttpError(status, code, f"image {bad[0].index} ({bad[0].name}): {bad[0].refused}",
                            [{"index": i.index, "name": i.name, "message": i.refused} for i in bad])


def decode_base64(text: str) -> bytes:
    """The bytes of a JSON image: plain base64, wrapped in lines (MIME, `base64` without -w0)
    or a data: URL (data:image/png;base64,...). ValueError for anything else."""
    text = text.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError("a data: URL must be base64 (data:image/png;base64,...)")
    return base64.b64decode("".join(text.split()), validate=True)


async def _read_body(request: Request, config: ServerConfig) -> tuple[list[RequestImage], dict]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request, config)
    if content_type == "application/json":
        return await _read_json(request)
    raise HttpError(415, "unsupported_media_type",
                    f"content type {content_type or 'none'!r} is not supported: send images as "
                    "multipart/form-data files or as a JSON body with base64 images")


async def _read_multipart(request: Request, config: ServerConfig) -> tuple[list[RequestImage], dict]:
    # Past max_files the parser refuses; that refusal becomes 413 below.
    try:
        form = await request.form(max_files=config.max_images, max_fields=32)
    except HTTPException as exc:  # Starlette's parser refuses past its limits with a bare 400
        if "files" in str(exc.detail).lower():
            raise HttpError(413, "too_many_images",
                            f"more than {config.max_images} images in one request; split it") from exc
        raise HttpError(400, "bad_multipart", f"the multipart body was refused: {exc.detail}") from exc
    images, params = [], {}
    try:
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                index = len(images)
                name = value.filename or f"image[{index}]"
                ctype = (value.content_type or "application/octet-stream").lower()
                if not (ctype.startswith("image/") or ctype == "application/octet-stream"):
                    # 415 unless partial=true, which may come later in the form: decided by check_images
                    images.append(RequestImage(index, name, b"", refused=f"content type {ctype!r} is not an image"))
                    continue
                data = await value.read(config.max_image_bytes + 1)
                images.append(RequestImage(index, name, data))
            else:
                params[field] = value
    finally:
        await form.close()
    return images, params


async def _read_json(request: Request) -> tuple[list[RequestImage], dict]:
    try:
        body = ClassifyJson.model_validate(parse_json(await request.body(), "the body"))
    except ValidationError as exc:
        raise invalid("invalid JSON body", exc) from exc
    images = []
    for index, image in enumerate(body.images):
        name = image.name or f"image[{index}]"
        try:
            images.append(RequestImage(index, name, decode_base64(image.data)))
        except (binascii.Error, ValueError) as exc:
            images.append(RequestImage(index, name, b"", refused=f"data is not valid base64 ({exc})", code="bad_image"))
    params = body.model_dump(exclude={"images"}, exclude_none=True)
    return images, params
