"""Cache endpoints: list and describe (read scope); activate, reload, delete (admin scope)."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Path as PathParam

from kvclip import artifact as store
from kvclip.errors import ArtifactError, KvclipError
from kvclip.service.deps import ready_state, require
from kvclip.service.errors import ApiError
from kvclip.service.registry import CacheNotFound, LoadedCache, VersionConflict, VersionNotFound
from kvclip.service.schemas import ActivateRequest, CacheDetail, CacheSummary, ReloadResponse
from kvclip.service.state import ServerState

router = APIRouter(prefix="/v1/caches", tags=["caches"])
CacheName = PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="cache name")
Version = PathParam(pattern=r"^v\d{4,}$", description="version, e.g. v0002")


def summary(loaded: LoadedCache) -> dict:
    art = loaded.artifact
    return {"name": loaded.name, "version": loaded.version, "model": loaded.model_id,
            "classes": loaded.num_classes, "items": loaded.num_items, "methods": art.methods,
            "best_method": art.best_method, "captions": art.caption_keys is not None}


@router.get("", response_model=list[CacheSummary], dependencies=[require("read")])
async def list_caches(state: ServerState = Depends(ready_state)) -> list[dict]:
    return [summary(c) for _, c in sorted(state.registry.snapshot().items())]


@router.get("/{name}", response_model=CacheDetail, dependencies=[require("read")])
async def show_cache(name: str = CacheName, state: ServerState = Depends(ready_state)) -> dict:
    loaded = _get(state, name)
    manifest = loaded.artifact.manifest
    cache_dir = state.registry.cache_dir(name)
    return {
        **summary(loaded),
        "labels": loaded.labels,
        "versions": store.list_versions(cache_dir),
        "current_version": store.current_version(cache_dir),
        "params": manifest.params,
        "report": manifest.build_report,
        "created": manifest.created_at,
    }


@router.post("/reload", response_model=ReloadResponse, dependencies=[require("admin")])
async def reload_caches(state: ServerState = Depends(ready_state)) -> dict:
    report = await asyncio.to_thread(state.registry.reload)
    return report.as_dict()


@router.post("/{name}/activate", response_model=CacheSummary, dependencies=[require("admin")])
async def activate(body: ActivateRequest, name: str = CacheName,
                   state: ServerState = Depends(ready_state)) -> dict:
    try:
        loaded = await asyncio.to_thread(state.registry.activate, name, body.version)
    except CacheNotFound as exc:
        raise ApiError(404, "unknown_cache", str(exc)) from exc
    except VersionConflict as exc:
        raise ApiError(404, "unknown_version", str(exc)) from exc
    except KvclipError as exc:  # corrupt or incompatible version: the old one keeps serving
        raise ApiError(409, "version_not_loadable", f"{name} {body.version} not activated: {exc}") from exc
    return summary(loaded)


@router.delete("/{name}/versions/{version}", status_code=204, dependencies=[require("admin")])
async def delete_version(name: str = CacheName, version: str = Version,
                         state: ServerState = Depends(ready_state)) -> None:
    try:
        await asyncio.to_thread(state.registry.delete_version, name, version)
    except VersionNotFound as exc:
        raise ApiError(404, "unknown_version", str(exc)) from exc
    except CacheNotFound as exc:
        raise ApiError(404, "unknown_cache", str(exc)) from exc
    except (VersionConflict, ArtifactError) as exc:
        raise ApiError(409, "version_in_use", str(exc)) from exc


def _get(state: ServerState, name: str) -> LoadedCache:
    try:
        return state.registry.get(name)
    except CacheNotFound as exc:
        raise ApiError(404, "unknown_cache", str(exc)) from exc
