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


def sees_server_paths(request: Request) -> bool:
    """Whether the caller may see server paths (build sources, job errors): admin keys only,
    or everyone on a server without keys (which lets everyone build anyway)."""
    return "admin" in get_state(request).api_keys.scopes(request.headers.get("authorization"),
                                                         request.headers.get("x-api-key"))


def require(scope: str):
    """Dependency: the request carries an API key with `scope` (when keys are configured);
    Unauthorized or Forbidden otherwise."""

    async def check(request: Request) -> None:
        get_state(request).api_keys.check(request.headers.get("authorization"), request.headers.get("x-api-key"),
                                          scope)

    return Depends(check)
