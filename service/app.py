"""The FastAPI application: routes, error handlers, middleware and lifecycle."""
from __future__ import annotations

import contextlib

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kvclip import __version__
from kvclip.models import Encoder
from kvclip.service import api_builds, api_caches, api_classify, api_health, api_items
from kvclip.service.config import ServerConfig
from kvclip.service.errors import install_handlers
from kvclip.service.middleware import BodyLimitMiddleware, ConcurrencyLimitMiddleware, RequestContextMiddleware
from kvclip.service.state import ServerState
from kvclip.service.timeouts import BodyTimeoutMiddleware
from kvclip.service.web.docs import router as docs_router
from kvclip.service.web.router import router as web_router


def create_app(config: ServerConfig, encoder: Encoder | None = None) -> FastAPI:
    """The app for `config`; pass a loaded `encoder` to skip loading the model at start."""
    state = ServerState(config=config, encoder=encoder)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="kvclip",
        version=__version__,
        description="Training-free zero-shot image classification: CLIP zero-shot logits blended "
        "with a key-value cache of support images and their captions.",
        lifespan=lifespan,
        docs_url=None,  # served from installed files instead of a CDN (service/web/docs.py)
    )
    app.state.kv = state
    install_handlers(app)
    add_openapi_schemas(app, {**api_classify.OPENAPI_SCHEMAS, **api_builds.OPENAPI_SCHEMAS})
    app.include_router(api_health.router)
    app.include_router(api_classify.router)
    app.include_router(api_caches.router)
    app.include_router(api_builds.router)
    app.include_router(api_items.router)
    app.include_router(web_router)  # the browser page at /, no API key
    app.include_router(docs_router)
    # Outermost first at run time: the request context sees every response, 413s included.
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes, build_limit=config.max_build_bytes)
    if config.body_timeout_s:
        app.add_middleware(BodyTimeoutMiddleware, timeout_s=config.body_timeout_s)
    if config.max_concurrency:
        app.add_middleware(ConcurrencyLimitMiddleware, limit=config.max_concurrency,
                           retry_after_s=config.retry_after_s)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    return app


def add_openapi_schemas(app: FastAPI, schemas: dict[str, dict]) -> None:
    """Register models that routes reference by hand in the generated OpenAPI document."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            document.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
