"""Cache builds over HTTP: POST /v1/caches/{name}/builds starts a job; /v1/jobs reports and
cancels. The build itself runs in a worker process (service/jobs.py)."""
from __future__ import annotations

import asyncio
import shutil

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from kvclip.service.api_caches import CacheName
from kvclip.service.archives import ArchiveError, extract_archive
from kvclip.service.build_requests import build_config, check_class_folders, check_mode, server_folder
from kvclip.service.build_worker import WorkerSpec
from kvclip.service.deps import ready_state, require, sees_server_paths
from kvclip.service.errors import HttpError, error_responses, invalid
from kvclip.service.parsing import parse_json
from kvclip.service.redact import redact_job
from kvclip.service.schemas import BuildOptions, JobInfo, JobList
from kvclip.service.state import ServerState
from kvclip.vocabulary import JOB_ID_PATTERN

router = APIRouter(tags=["builds"])
# The body is read by hand (JSON or multipart), so app.py registers its model for OpenAPI.
OPENAPI_SCHEMAS: dict[str, dict] = {"BuildOptions": BuildOptions.model_json_schema()}
JobId = PathParam(pattern=JOB_ID_PATTERN, description="job id")

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "options": {"type": "string", "description": "BuildOptions as a JSON string"},
                "data": {"type": "string", "format": "binary",
                         "description": "zip or tar of DATA/<label>/<image> (+ <image>.txt captions)"},
                "pool": {"type": "string", "format": "binary",
                         "description": "zip or tar of unlabelled images (needs labels)"}}}},
            "application/json": {"schema": {"$ref": "#/components/schemas/BuildOptions"}},
        },
    }
}


_AUTH = (401, 403, 503)


@router.post("/v1/caches/{name}/builds", status_code=202, response_model=JobInfo, openapi_extra=_BODY_DOC,
             dependencies=[require("admin")], responses=error_responses(*_AUTH, 400, 408, 413, 415, 422, described={
                 403: "API key lacks the admin scope, or a server folder outside --build-roots"}))
async def start_build(request: Request, name: str = CacheName,
                      state: ServerState = Depends(ready_state)) -> JSONResponse:
    job = state.jobs.new_job(name, {}, state.config.jobs_root)
    try:
        options, data_root, pool_root, upload = await _read_request(request, state, job.id, job.workdir)
        job.options = options.model_dump(exclude_none=True)
        uploaded = data_root if options.data_dir is None and data_root is not None else pool_root
        job.spec = WorkerSpec(
            config=build_config(name, options, data_root, pool_root, state.config, owner=job.id,
                                source_name=f"uploaded archive {upload}" if upload else None),
            nice=state.config.build_nice, threads=state.config.build_threads,
            uploads={uploaded: f"archive {upload}"} if upload and uploaded is not None else {},
        )
    except BaseException:
        state.jobs.discard_workdir(job)
        raise
    state.jobs.submit(job)
    return JSONResponse(job.as_dict(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs", response_model=JobList, dependencies=[require("read")], responses=error_responses(*_AUTH))
async def list_jobs(request: Request, state: ServerState = Depends(ready_state)) -> dict:
    admin = sees_server_paths(request)
    return {"jobs": [_job_answer(job.as_dict(), admin) for job in state.jobs.list()]}


@router.get("/v1/jobs/{job_id}", response_model=JobInfo, dependencies=[require("read")],
            responses=error_responses(*_AUTH, 404, 422))
async def show_job(request: Request, job_id: str = JobId, state: ServerState = Depends(ready_state)) -> dict:
    return _job_answer(state.jobs.get(job_id).as_dict(), sees_server_paths(request))


def _job_answer(job: dict, admin: bool) -> dict:
    """Server paths (sources, work folders in errors) for admin keys only: service/redact.py."""
    return job if admin else redact_job(job)


@router.delete("/v1/jobs/{job_id}", status_code=202, response_model=JobInfo, dependencies=[require("admin")],
               responses=error_responses(*_AUTH, 404, 422))
async def cancel_job(job_id: str = JobId, state: ServerState = Depends(ready_state)) -> dict:
    return state.jobs.cancel(job_id).as_dict()


async def _read_request(request: Request, state: ServerState, job_id: str, workdir):
    """(options, data folder or None, pool folder or None, the name of the upload the build reads
    or None), uploads unpacked into workdir."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: dict[str, UploadFile] = {}
    if content_type == "application/json":
        options = _parse_options(await request.body())
    elif content_type == "multipart/form-data":
        options, uploads = await _read_form(request)
    else:
        raise HttpError(415, "unsupported_media_type",
                        f"content type {content_type or 'none'!r} is not supported: send application/json "
                        "options, or multipart/form-data with an 'options' field and 'data'/'pool' archives")
    try:
        has_data = "data" in uploads or options.data_dir is not None
        has_pool = "pool" in uploads or options.pool_dir is not None
        check_mode(options, has_data, has_pool)
        if "data" in uploads and options.data_dir or "pool" in uploads and options.pool_dir:
            raise HttpError(422, "invalid_parameters", "give an uploaded archive or a server folder, not both")
        data_root = pool_root = None
        if options.data_dir:
            data_root = server_folder(options.data_dir, state.config, "data_dir")
        if options.pool_dir:
            pool_root = server_folder(options.pool_dir, state.config, "pool_dir")
        if "data" in uploads:
            data_root = await _unpack(uploads["data"], workdir / "data", state, job_id)
        if "pool" in uploads:
            pool_root = await _unpack(uploads["pool"], workdir / "pool", state, job_id)
        if data_root is not None:
            await asyncio.to_thread(check_class_folders, data_root)
        read = uploads.get("data") or uploads.get("pool")
        return options, data_root, pool_root, (read.filename or "upload") if read is not None else None
    finally:
        for upload in uploads.values():
            await upload.close()


async def _read_form(request: Request) -> tuple[BuildOptions, dict[str, UploadFile]]:
    try:
        form = await request.form(max_files=2, max_fields=4)
    except HTTPException as exc:
        raise HttpError(400, "bad_multipart", f"the multipart body was refused: {exc.detail}") from exc
    uploads, raw = {}, None
    for field, value in form.multi_items():
        if isinstance(value, UploadFile):
            if field not in ("data", "pool") or field in uploads:
                raise HttpError(422, "invalid_parameters",
                                f"unexpected file field {field!r}: send one 'data' and/or one 'pool' archive")
            uploads[field] = value
        elif field == "options":
            raw = value
        else:
            raise HttpError(422, "invalid_parameters", f"unexpected form field {field!r}")
    return _parse_options(raw or "{}"), uploads


def _parse_options(raw: str | bytes) -> BuildOptions:
    try:
        return BuildOptions.model_validate(parse_json(raw, "the build options"))
    except ValidationError as exc:
        raise invalid("invalid build options", exc) from exc


async def _unpack(upload: UploadFile, dest, state: ServerState, job_id: str):
    config, budget = state.config, state.jobs.budget
    archive = dest.parent / f"{dest.name}.upload"

    def charge(n: int) -> None:
        if budget is not None:
            budget.charge(job_id, n, dest)

    def work():
        dest.parent.mkdir(parents=True, exist_ok=True)
        if budget is not None:  # the archive's own copy, then what it unpacks to, must fit
            budget.check_disk(dest.parent, upload.size or 0)
        with open(archive, "wb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out, 1 << 20)
        try:
            return extract_archive(archive, dest, config.max_archive_files, config.max_extracted_bytes, charge)
        finally:
            archive.unlink(missing_ok=True)

    try:
        return await asyncio.to_thread(work)
    except ArchiveError as exc:  # the same error, naming the upload (400, or 413 when too large)
        raise type(exc)(f"{upload.filename or 'the upload'}: {exc}") from exc
