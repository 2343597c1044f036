"""Routes: /v1/jobs (create, list, get, cancel, report, artifacts) and the health probes."""

from __future__ import annotations

import mimetypes
import os
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.auth import require_owner
from api.errors import ApiError, documented
from api.jobs import JobService
from api.schemas import ArtifactList, ArtifactView, Health, JobList, JobView
from flow_compress.schema import CompressionReport
from worker.jobs import JobRecord, JobState
from worker.storage import JOB_ID, Storage
from worker.store import JobStore

Owner = Annotated[str, Depends(require_owner)]
MAX_OFFSET = 1_000_000_000

# Error responses per route, by error code (api.errors maps codes to statuses). 401 is
# declared on every /v1 route and removed from the served spec when API keys are off.
_CREATE_ERRORS = documented(
    "bad_request",
    "invalid_multipart",
    "payload_too_large",
    "unsupported_media_type",
    "validation_error",
    "invalid_archive",
    "invalid_config",
    "unsupported_model",
    "invalid_dataset",
    "dataset_not_found",
    "bad_checkpoint",
)
_LIST_ERRORS = documented("validation_error")
_JOB_ERRORS = documented("not_found")
_CANCEL_ERRORS = documented("not_found", "job_finished")
_RESULT_ERRORS = documented("not_found", "artifacts_not_available")

jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=documented("unauthorized"))
health = APIRouter(tags=["health"])


def _store(request: Request) -> JobStore:
    return request.app.state.store  # type: ignore[no-any-return]


def _storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


def _service(request: Request) -> JobService:
    return request.app.state.jobs  # type: ignore[no-any-return]


def _owned(request: Request, owner: str, job_id: str) -> JobRecord:
    """The caller's job, or 404 (another owner's job is indistinguishable from none)."""
    record = _store(request).get(job_id) if JOB_ID.match(job_id) else None
    if record is None or record.owner != owner:
        raise ApiError("not_found", f"no job {job_id}")
    return record


def _succeeded(record: JobRecord) -> None:
    if record.state is not JobState.succeeded:
        raise ApiError(
            "artifacts_not_available",
            f"job {record.id} is {record.state.value}; artifacts exist only for succeeded jobs",
        )


_CREATE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["spec"],
                "properties": {
                    "spec": {
                        "$ref": "#/components/schemas/JobSpec",
                        "description": "JSON of a JobSpec. Send it first: it is validated "
                        "before the files are read.",
                    },
                    "weights": {
                        "type": "string",
                        "format": "binary",
                        "description": "safetensors or a weights-only torch state dict",
                    },
                    "dataset": {
                        "type": "string",
                        "format": "binary",
                        "description": "zip or tar of an ImageFolder; set config.dataset "
                        "to 'upload'",
                    },
                },
            },
            "encoding": {"spec": {"contentType": "application/json"}},
        },
        "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
    },
}


@jobs.post(
    "",
    status_code=202,
    response_model=JobView,
    responses=_CREATE_ERRORS,
    openapi_extra={"requestBody": _CREATE_BODY},
    summary="Submit a compression job",
)
async def create_job(
    request: Request,
    response: Response,
    owner: Owner,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobView:
    """Multipart (``spec`` + ``weights`` file + optional ``dataset`` archive) or a JSON
    ``JobSpec`` naming weights on the server. Answers 202 with the job and its Location;
    a repeated Idempotency-Key answers with the job it created first."""
    record, created = await _service(request).create(request, owner, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return JobView.of(record)


@jobs.get(
    "", response_model=JobList, responses=_LIST_ERRORS, summary="List your jobs, newest first"
)
def list_jobs(
    request: Request,
    owner: Owner,
    state: JobState | None = None,
    # Bounded: Redis ranges are 64-bit, and an offset past any real job count is a bad request.
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    records, total = _store(request).list(owner, state=state, offset=offset, limit=limit)
    return JobList(items=[JobView.of(r) for r in records], total=total, offset=offset, limit=limit)


@jobs.get("/{job_id}", response_model=JobView, responses=_JOB_ERRORS, summary="Poll a job")
def get_job(request: Request, owner: Owner, job_id: str) -> JobView:
    return JobView.of(_owned(request, owner, job_id))


@jobs.delete(
    "/{job_id}",
    response_model=JobView,
    responses={**_CANCEL_ERRORS, 202: {"model": JobView, "description": "Cancel requested"}},
    summary="Cancel a job",
)
def cancel_job(request: Request, response: Response, owner: Owner, job_id: str) -> JobView:
    """A queued job is cancelled at once (200) and never starts; a running job is flagged
    (202) and stops at its next step, discarding its partial output; cancelling a cancelled
    job is a no-op (200); a succeeded or failed job cannot be cancelled (409)."""
    record = _owned(request, owner, job_id)
    if record.state in (JobState.succeeded, JobState.failed):
        raise ApiError("job_finished", f"job {job_id} already {record.state.value}")
    updated = _service(request).cancel(record)
    if updated.state is JobState.running:
        response.status_code = 202
    return JobView.of(updated)


@jobs.get(
    "/{job_id}/report",
    response_model=CompressionReport,
    responses=_RESULT_ERRORS,
    summary="The compression report of a succeeded job",
)
def get_report(request: Request, owner: Owner, job_id: str) -> Response:
    record = _owned(request, owner, job_id)
    _succeeded(record)
    found = _storage(request).artifact_file(job_id, "report.json")
    if found is None:
        raise ApiError("artifacts_not_available", f"job {job_id} has no report")
    # Served as stored (validated when the job finished), not re-serialised.
    return FileResponse(found[0], media_type="application/json")


@jobs.get(
    "/{job_id}/artifacts",
    response_model=ArtifactList,
    responses=_RESULT_ERRORS,
    summary="Files of a succeeded job (from its manifest)",
)
def list_artifacts(request: Request, owner: Owner, job_id: str) -> ArtifactList:
    record = _owned(request, owner, job_id)
    _succeeded(record)
    manifest = _storage(request).read_manifest(job_id)
    if manifest is None:
        raise ApiError("artifacts_not_available", f"job {job_id} has no manifest")
    return ArtifactList(
        job_id=job_id,
        files=[
            ArtifactView(
                name=f.name,
                size=f.size,
                sha256=f.sha256,
                url=f"/v1/jobs/{job_id}/artifacts/{f.name}",
            )
            for f in manifest.files
        ],
    )


@jobs.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={**_RESULT_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    summary="Download one artifact (streamed)",
)
def download_artifact(request: Request, owner: Owner, job_id: str, name: str) -> FileResponse:
    record = _owned(request, owner, job_id)
    _succeeded(record)
    found = _storage(request).artifact_file(job_id, name)
    if found is None:
        raise ApiError("not_found", f"job {job_id} has no artifact {name!r}")
    path, entry = found
    media_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
    return FileResponse(
        path,
        media_type=media_type,
        filename=entry.name,
        headers={"ETag": f'"{entry.sha256}"', "X-Content-SHA256": entry.sha256},
    )


@health.get("/healthz", response_model=Health, summary="Liveness: the process serves")
def healthz() -> Health:
    return Health(status="ok")


@health.get(
    "/readyz",
    response_model=Health,
    responses=documented("storage_unavailable"),
    summary="Readiness: Redis (broker and job store) reachable, storage writable",
)
async def readyz(request: Request) -> Health:
    store = _store(request)
    storage = _storage(request)
    try:
        await run_in_threadpool(store.ping)
    except Exception as exc:
        raise ApiError("broker_unavailable", f"Redis is unreachable: {exc}") from None
    if not storage.root.is_dir() or not _writable(storage):
        raise ApiError("storage_unavailable", f"storage {storage.root} is not writable")
    return Health(status="ready", checks={"broker": "ok", "storage": "ok"})


def _writable(storage: Storage) -> bool:
    return os.access(storage.root, os.W_OK)
