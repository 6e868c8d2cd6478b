"""POST /v1/classify: body -> RequestImages + params (service/parsing.py) -> the cache ->
ClassifyPipeline (service/classify.py) -> JSON results."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from kvclip.device_decode import DeviceJpegDecoder
from kvclip.service.admission import until_disconnected
from kvclip.service.classify import ClassifyPipeline
from kvclip.service.deps import ready_state, require
from kvclip.service.errors import error_responses
from kvclip.service.parsing import read_classify_request
from kvclip.service.schemas import ClassifyJson, ClassifyResponse, MethodName
from kvclip.service.state import ServerState
from kvclip.vocabulary import DEFAULT_TOP_K, MAX_TOP_K

router = APIRouter(tags=["classify"])

# The JSON body is read by hand (it shares the route with multipart), so FastAPI does not
# know its models; app.py adds these to the OpenAPI components.
_JSON_SCHEMA = ClassifyJson.model_json_schema(ref_template="#/components/schemas/{model}")
OPENAPI_SCHEMAS: dict[str, dict] = {**_JSON_SCHEMA.pop("$defs", {}), "ClassifyJson": _JSON_SCHEMA}
BODY_DOC = {
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
ERROR_DOC = error_responses(described={
    400: "an image could not be decoded (details name it)", 401: "API key missing or invalid",
    403: "API key lacks the read scope", 404: "unknown cache", 408: "the body was not received in time",
    413: "body, image or image count too large",
    415: "body is neither multipart/form-data nor application/json", 422: "invalid parameters",
    503: "not ready, the queue or decode backlog is full, or a decode worker process died (see Retry-After)"})


def classify_query(
    cache: str | None = Query(None, description="cache name"),
    top_k: int | None = Query(None, ge=1, le=MAX_TOP_K, description=f"labels per image (default {DEFAULT_TOP_K})"),
    method: MethodName | None = Query(None, description="auto (tuned), zeroshot, tip, tipx or caps"),
    explain: bool | None = Query(None, description="also return the nearest support items"),
    partial: bool | None = Query(None, description="report unreadable images per image instead of 400"),
    min_score: float | None = Query(None, description="abstain below this top score (default: the cache's)"),
) -> dict:
    """The query-string parameters (None: not given; the body may set them instead)."""
    return {"cache": cache, "top_k": top_k, "method": method, "explain": explain, "partial": partial,
            "min_score": min_score}


@router.post("/v1/classify", response_model=ClassifyResponse, openapi_extra=BODY_DOC, responses=ERROR_DOC,
             dependencies=[require("read")])
async def classify(request: Request, query: dict = Depends(classify_query),
                   state: ServerState = Depends(ready_state)) -> ClassifyResponse:
    parsed = await read_classify_request(request, query, state.config)
    cache = state.registry.get(parsed.params.cache)
    state.batcher.check_room(len(parsed.images))  # admitted (or refused) before any decoding
    pipeline = ClassifyPipeline(state.config, state.encoder.preprocess, state.decoder, state.batcher,
                                decode_size=state.encoder.image_size,
                                jpeg_decoder=DeviceJpegDecoder.for_encoder(state.encoder),
                                processes=state.decode_processes)
    response = await until_disconnected(request, pipeline.run(cache, parsed))
    state.metrics.cache_requests.labels(cache.name, response.method).inc()
    state.metrics.images.labels(cache.name).inc(sum(r.error is None for r in response.results))
    return response
