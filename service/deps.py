"""FastAPI dependencies: the app state, readiness and API-key scopes."""
from __future__ import annotations

from fastapi import Depends, Request

from kvclip.service.errors import ApiError
from kvclip.service.security import AuthError
from kvclip.service.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.kv


def ready_state(request: Request) -> ServerState:
    state = get_state(request)
    if not state.ready:
        why = state.load_error or "the model and caches are still loading"
        raise ApiError(503, "not_ready", f"server not ready: {why}",
                       headers={"Retry-After": str(state.config.retry_after_s)})
    return state


def require(scope: str):
    """Dependency: the request carries an API key with `scope` (when keys are configured)."""

    async def check(request: Request) -> None:
        try:
            get_state(request).api_keys.check(
                request.headers.get("authorization"), request.headers.get("x-api-key"), scope
            )
        except AuthError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            code = "unauthorized" if exc.status == 401 else "forbidden"
            raise ApiError(exc.status, code, exc.message, headers=headers) from exc

    return Depends(check)
