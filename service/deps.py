"""FastAPI dependencies: the app state, readiness and API-key scopes."""
from __future__ import annotations

from fastapi import Depends, Request

from kvclip.service.redact import redact_text
from kvclip.service.security import AuthError
from kvclip.service.state import NotReady, ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.kv


def ready_state(request: Request) -> ServerState:
    state = get_state(request)
    if not state.ready:
        reason = state.load_error if sees_server_paths(request) else redact_text(state.load_error)
        raise NotReady(f"server not ready: {reason or 'the model and caches are still loading'}")
    return state


def sees_server_paths(request: Request) -> bool:
    """Whether the caller may see server paths (build sources, job errors, load errors): admin
    keys only, or everyone on a server without keys (which lets everyone build anyway). A
    missing or unknown key sees none, without a 401: unauthenticated routes (/readyz) ask too."""
    try:
        scopes = get_state(request).api_keys.scopes(request.headers.get("authorization"),
                                                    request.headers.get("x-api-key"))
    except AuthError:
        return False
    return "admin" in scopes


def require(scope: str):
    """Dependency: the request carries an API key with `scope` (when keys are configured);
    Unauthorized or Forbidden otherwise."""

    async def check(request: Request) -> None:
        get_state(request).api_keys.check(request.headers.get("authorization"), request.headers.get("x-api-key"),
                                          scope)

    return Depends(check)
