"""FastAPI dependencies: the app state, readiness and API-key scopes."""
from __future__ import annotations

from fastapi import Depends, Request

from kvclip.service.state import NotReady, ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.kv


def ready_state(request: Request) -> ServerState:
    state = get_state(request)
    if not state.ready:
        raise NotReady(f"server not ready: {state.load_error or 'the model and caches are still loading'}")
    return state


def require(scope: str):
    """Dependency: the request carries an API key with `scope` (when keys are configured);
    Unauthorized or Forbidden otherwise."""

    async def check(request: Request) -> None:
        get_state(request).api_keys.check(request.headers.get("authorization"), request.headers.get("x-api-key"),
                                          scope)

    return Depends(check)
