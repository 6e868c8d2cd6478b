"""POST /v1/classify: request -> images -> features -> blended logits -> JSON results."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json

import torch
from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from kvclip.service.batcher import Overloaded, Stopped
from kvclip.service.classify import ImageInput, Prepared, ScoreOptions, prepare, score
from kvclip.service.deps import ready_state, require
from kvclip.service.errors import ApiError, invalid
from kvclip.service.registry import CacheNotFound, LoadedCache
from kvclip.service.schemas import ClassifyJson, ClassifyParams, ClassifyResponse, ImageResult, MethodName
from kvclip.service.state import ServerState

router = APIRouter(tags=["classify"])

# The JSON body is read by hand (it shares the route with multipart), so FastAPI does not
# know its models; app.py adds these to the OpenAPI components.
_JSON_SCHEMA = ClassifyJson.model_json_schema(ref_template="#/components/schemas/{model}")
OPENAPI_SCHEMAS: dict[str, dict] = {**_JSON_SCHEMA.pop("$defs", {}), "ClassifyJson": _JSON_SCHEMA}
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": "one or more image files (any field name; order kept)"}}}},
            "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyJson"}},
        },
    }
}
_ERRORS = {s: {"description": d} for s, d in {
    400: "an image could not be decoded (details name it)", 401: "API key missing or invalid",
    403: "API key lacks the read scope", 404: "unknown cache", 413: "body, image or image count too large",
    415: "body is neither multipart/form-data nor application/json", 422: "invalid parameters",
    503: "not ready, or the queue is full (see Retry-After)"}.items()}


@router.post("/v1/classify", response_model=ClassifyResponse, openapi_extra=_BODY_DOC, responses=_ERRORS,
             dependencies=[require("read")])
async def classify(
    request: Request,
    cache: str | None = Query(None, description="cache name"),
    top_k: int | None = Query(None, description="labels per image (default 5)"),
    method: MethodName | None = Query(None, description="auto (tuned), zeroshot, tip, tipx or caps"),
    explain: bool | None = Query(None, description="also return the nearest support items"),
    partial: bool | None = Query(None, description="report unreadable images per image instead of 400"),
    state: ServerState = Depends(ready_state),
) -> ClassifyResponse:
    query = {"cache": cache, "top_k": top_k, "method": method, "explain": explain, "partial": partial}
    inputs, body_params = await _read_body(request, state)
    params = _merge_params(query, body_params)
    try:
        loaded = state.registry.get(params.cache)
    except CacheNotFound as exc:
        raise ApiError(404, "unknown_cache", str(exc)) from exc
    method_name = choose_method(loaded, params.method)
    _check_sizes(inputs, state)

    loop = asyncio.get_running_loop()
    preprocess, max_pixels = state.encoder.preprocess, state.config.max_pixels
    prepared: list[Prepared] = await asyncio.gather(*(
        loop.run_in_executor(state.decode_pool, prepare, item, preprocess, max_pixels) for item in inputs
    ))
    good = decoded(prepared, params.partial)
    scored = await _score(state, loaded, good, score_options(state.config, method_name, params))
    state.metrics.cache_requests.labels(loaded.name, method_name).inc()
    state.metrics.images.labels(loaded.name).inc(len(good))
    return ClassifyResponse(
        cache=loaded.name, version=loaded.version, method=method_name, model=loaded.model_id,
        results=[_result(p, scored.get(p.index)) for p in prepared],
    )


def choose_method(loaded: LoadedCache, requested: str) -> str:
    """The method to run: the cache's tuned one for 'auto'; 422 when the cache cannot serve it."""
    method = loaded.artifact.best_method if requested == "auto" else requested
    if method not in loaded.artifact.methods:
        raise ApiError(422, "invalid_parameters",
                       f"cache {loaded.name!r} cannot serve method {method!r} "
                       f"(it serves {', '.join(loaded.artifact.methods)})")
    return method


def decoded(prepared: list[Prepared], partial: bool) -> list[Prepared]:
    """The usable images; without `partial`, any unusable one fails the request (named): 415 for
    a part declared as a non-image type, 400 for bytes that do not decode."""
    bad = [p for p in prepared if p.pixels is None]
    refused = [p for p in bad if p.code == "unsupported_media_type"]
    if refused and not partial:
        raise ApiError(415, "unsupported_media_type",
                       f"image {refused[0].index} ({refused[0].name}): {refused[0].error}; send image files",
                       [{"index": p.index, "name": p.name, "message": p.error} for p in refused])
    if bad and not partial:
        raise ApiError(400, "bad_image",
                       f"{len(bad)} of {len(prepared)} images could not be decoded: {bad[0].error}",
                       [{"index": p.index, "name": p.name, "message": p.error} for p in bad])
    return [p for p in prepared if p.pixels is not None]


def score_options(config, method: str, params: ClassifyParams) -> ScoreOptions:
    return ScoreOptions(method=method, top_k=params.top_k, explain_k=config.explain_k if params.explain else 0,
                        dense_max_keys=config.dense_max_keys, faiss_k=config.faiss_k)


async def _score(state: ServerState, loaded: LoadedCache, good: list[Prepared], options: ScoreOptions) -> dict:
    if not good:
        return {}
    try:
        features = await state.batcher.encode_images(torch.stack([p.pixels for p in good]))
    except Overloaded as exc:
        raise ApiError(503, "overloaded", f"server overloaded: {exc}; retry later",
                       headers={"Retry-After": str(state.config.retry_after_s)}) from exc
    except Stopped as exc:
        raise ApiError(503, "shutting_down", str(exc),
                       headers={"Retry-After": str(state.config.retry_after_s)}) from exc
    results = await state.batcher.run_on_device(score, features, loaded, options)
    return {p.index: r for p, r in zip(good, results)}


def _result(p: Prepared, scored) -> ImageResult:
    if scored is None:
        return ImageResult(index=p.index, name=p.name, error={"code": p.code, "message": p.error})
    return ImageResult(
        index=p.index, name=p.name,
        labels=[{"label": lb, "score": s, "logit": lg} for lb, s, lg in scored.labels],
        neighbors=scored.neighbors,
    )


async def _read_body(request: Request, state: ServerState) -> tuple[list[ImageInput], dict]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request, state)
    if content_type == "application/json":
        return await _read_json(request)
    raise ApiError(415, "unsupported_media_type",
                   f"content type {content_type or 'none'!r} is not supported: send images as "
                   "multipart/form-data files or as a JSON body with base64 images")


async def _read_multipart(request: Request, state: ServerState) -> tuple[list[ImageInput], dict]:
    # Past max_files the parser refuses; that refusal becomes 413 below.
    try:
        form = await request.form(max_files=state.config.max_images, max_fields=32)
    except HTTPException as exc:  # Starlette's parser refuses past its limits with a bare 400
        if "files" in str(exc.detail).lower():
            raise ApiError(413, "too_many_images",
                           f"more than {state.config.max_images} images in one request; split it") from exc
        raise ApiError(400, "bad_multipart", f"the multipart body was refused: {exc.detail}") from exc
    inputs, params = [], {}
    try:
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                index = len(inputs)
                name = value.filename or f"image[{index}]"
                ctype = (value.content_type or "application/octet-stream").lower()
                if not (ctype.startswith("image/") or ctype == "application/octet-stream"):
                    # 415 unless partial=true, which may come later in the form: decided in decoded()
                    inputs.append(ImageInput(index, name, b"", refused=f"content type {ctype!r} is not an image"))
                    continue
                data = await value.read(state.config.max_image_bytes + 1)
                inputs.append(ImageInput(index, name, data))
            else:
                params[field] = value
    finally:
        await form.close()
    return inputs, params


async def _read_json(request: Request) -> tuple[list[ImageInput], dict]:
    try:
        body = ClassifyJson.model_validate(json.loads(await request.body()))
    except ValidationError as exc:
        raise invalid("invalid JSON body", exc) from exc
    except ValueError as exc:  # JSONDecodeError, and bytes that are not UTF-8 text
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from exc
    inputs = []
    for index, image in enumerate(body.images):
        name = image.name or f"image[{index}]"
        try:
            data = base64.b64decode(image.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "bad_image", f"image {index} ({name}): data is not valid base64",
                           [{"index": index, "name": name, "message": "invalid base64"}]) from exc
        inputs.append(ImageInput(index, name, data))
    params = body.model_dump(exclude={"images"}, exclude_none=True)
    return inputs, params


def _merge_params(query: dict, body: dict) -> ClassifyParams:
    merged = {k: v for k, v in query.items() if v is not None} | body
    try:
        return ClassifyParams.model_validate(merged)
    except ValidationError as exc:
        raise invalid("invalid parameters", exc) from exc


def _check_sizes(inputs: list[ImageInput], state: ServerState) -> None:
    if not inputs:
        raise ApiError(422, "no_images", "the request carries no images")
    if len(inputs) > state.config.max_images:
        raise ApiError(413, "too_many_images",
                       f"{len(inputs)} images in one request; the limit is {state.config.max_images}")
    limit = state.config.max_image_bytes
    big = [i for i in inputs if len(i.data) > limit]
    if big:
        raise ApiError(413, "image_too_large", f"image {big[0].index} ({big[0].name}) exceeds {limit} bytes",
                       [{"index": i.index, "name": i.name, "message": f"more than {limit} bytes"} for i in big])
