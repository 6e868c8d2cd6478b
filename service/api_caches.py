"""Cache endpoints: list and describe (read scope); activate, reload, delete (admin scope).

Registry errors (unknown cache or version, version in use or not loadable) propagate to
the error table in service/errors.py."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam

from kvclip import artifact as store
from kvclip.service.deps import ready_state, require, sees_server_paths
from kvclip.service.errors import error_responses
from kvclip.service.redact import redact_report
from kvclip.service.registry import LoadedCache
from kvclip.service.schemas import ActivateRequest, CacheDetail, CacheSummary, ReloadResponse
from kvclip.service.state import ServerState
from kvclip.vocabulary import CACHE_NAME_PATTERN, VERSION_PATTERN

router = APIRouter(prefix="/v1/caches", tags=["caches"])
_AUTH = (401, 403, 503)
CacheName = PathParam(pattern=CACHE_NAME_PATTERN, description="cache name")
Version = PathParam(pattern=VERSION_PATTERN, description="version, e.g. v0002")


def summary(loaded: LoadedCache) -> dict:
    art = loaded.artifact
    return {"name": loaded.name, "version": loaded.version, "model": loaded.model_id,
            "classes": loaded.num_classes, "items": loaded.num_items, "methods": art.methods,
            "best_method": art.best_method, "captions": art.caption_keys is not None}


@router.get("", response_model=list[CacheSummary], dependencies=[require("read")], responses=error_responses(*_AUTH))
async def list_caches(state: ServerState = Depends(ready_state)) -> list[dict]:
    return [summary(c) for _, c in sorted(state.registry.snapshot().items())]


@router.get("/{name}", response_model=CacheDetail, dependencies=[require("read")],
            responses=error_responses(*_AUTH, 404, 422))
async def show_cache(request: Request, name: str = CacheName, state: ServerState = Depends(ready_state)) -> dict:
    loaded = state.registry.get(name)
    manifest = loaded.artifact.manifest
    cache_dir = state.registry.cache_dir(name)
    report = manifest.build_report.model_dump(mode="json")
    return {
        **summary(loaded),
        "labels": loaded.labels,
        "versions": store.list_versions(cache_dir),
        "current_version": store.current_version(cache_dir),
        "params": manifest.params,
        "report": report if sees_server_paths(request) else redact_report(report),
        "created": manifest.created_at,
        "search": loaded.search.as_dict(),
        "key_precision": loaded.key_precision,
    }


@router.post("/reload", response_model=ReloadResponse, dependencies=[require("admin")],
             responses=error_responses(*_AUTH))
async def reload_caches(state: ServerState = Depends(ready_state)) -> dict:
    report = await asyncio.to_thread(state.registry.reload)
    return report.as_dict()


@router.post("/{name}/activate", response_model=CacheSummary, dependencies=[require("admin")],
             responses=error_responses(*_AUTH, 400, 404, 408, 409, 413, 422))
async def activate(body: ActivateRequest, name: str = CacheName,
                   state: ServerState = Depends(ready_state)) -> dict:
    loaded = await asyncio.to_thread(state.registry.activate, name, body.version)
    return summary(loaded)


@router.delete("/{name}/versions/{version}", status_code=204, dependencies=[require("admin")],
               responses=error_responses(*_AUTH, 404, 409, 422))
async def delete_version(name: str = CacheName, version: str = Version,
                         state: ServerState = Depends(ready_state)) -> None:
    await asyncio.to_thread(state.registry.delete_version, name, version)
