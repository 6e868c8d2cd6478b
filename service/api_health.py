"""Liveness, readiness and Prometheus metrics (unauthenticated, for probes and scrapers)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvclip.service.deps import get_state, sees_server_paths
from kvclip.service.redact import redact_text
from kvclip.service.schemas import ReadyResponse
from kvclip.service.state import ServerState

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(request: Request, response: Response, state: ServerState = Depends(get_state)) -> ReadyResponse:
    """200 once the model and the caches folder are loaded, 503 before (or if loading failed).
    Its errors name server paths for admin keys only (probes send no key; the log has them all)."""
    registry = state.registry
    if not state.ready:
        response.status_code = 503
        response.headers["Retry-After"] = str(state.config.retry_after_s)
    errors = ({"model": state.load_error} if state.load_error else {}) | (registry.errors if registry else {})
    if not sees_server_paths(request):
        errors = {name: redact_text(text) or "" for name, text in errors.items()}
    return ReadyResponse(
        ready=state.ready,
        model=state.encoder.model_id if state.encoder else None,
        device=str(state.encoder.device) if state.encoder else None,
        caches={n: c.version for n, c in registry.snapshot().items()} if registry else {},
        errors=errors,
    )


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    """Prometheus metrics (text exposition format, version 0.0.4)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
