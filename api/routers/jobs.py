"""/v1/jobs: create, list, poll, cancel, and a succeeded job's report and artifacts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse

from api.deps import BodyDep, JobsDep, OwnerDep, ReaderDep, SettingsDep, StorageDep, StoreDep
from api.downloads import artifact_response
from api.errors import ApiError, documented
from api.schemas import ArtifactList, ArtifactView, JobList, JobView
from flow_compress.schema import CompressionReport
from worker.jobs import JobRecord, JobState
from worker.storage import JOB_ID
from worker.store import JobStore

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
    "invalid_webhook_url",
    "webhook_host_not_allowed",
    "invalid_config",
    "unsupported_model",
    "invalid_dataset",
    "dataset_not_found",
    "bad_checkpoint",
    "weights_not_found",
    "idempotency_key_reused",
    "job_too_large",
    "download_not_allowed",
    "request_timeout",
    "quota_exceeded",
)
_LIST_ERRORS = documented("validation_error")
_JOB_ERRORS = documented("not_found")
_CANCEL_ERRORS = documented("not_found")
_RESULT_ERRORS = documented("not_found", "artifacts_not_available", "artifacts_expired")
_DOWNLOAD_ERRORS = documented(
    "not_found",
    "artifacts_not_available",
    "artifacts_expired",
    "invalid_range",
    "range_not_satisfiable",
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=documented("unauthorized"))


def owned(store: JobStore, owner: str, job_id: str) -> JobRecord:
    """The caller's job, or 404 (another owner's job is indistinguishable from none)."""
    record = store.get(job_id) if JOB_ID.match(job_id) else None
    if record is None or record.owner != owner:
        raise ApiError("not_found", f"no job {job_id}")
    return record


def _succeeded(record: JobRecord) -> None:
    if record.expired_at is not None:
        how = "deleted by its owner" if record.expired_reason == "deleted" else "expired"
        raise ApiError("artifacts_expired", f"job {record.id}'s files were {how}")
    if record.state is not JobState.succeeded:
        raise ApiError(
            "artifacts_not_available",
            f"job {record.id} is {record.state.value}; artifacts exist only for succeeded jobs",
        )


CREATE_BODY: dict[str, Any] = {
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


@router.post(
    "",
    status_code=202,
    response_model=JobView,
    responses=_CREATE_ERRORS,
    openapi_extra={"requestBody": CREATE_BODY},
    summary="Submit a compression job",
)
async def create_job(
    body: BodyDep,
    jobs: JobsDep,
    response: Response,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobView:
    """Multipart (``spec`` + ``weights`` file + optional ``dataset`` archive) or a JSON
    ``JobSpec`` naming weights on the server. Answers 202 with the job and its Location;
    a repeated Idempotency-Key answers with the job it created first."""
    record, created = await jobs.create(body, owner, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return JobView.of(record)


@router.get(
    "", response_model=JobList, responses=_LIST_ERRORS, summary="List your jobs, newest first"
)
def list_jobs(
    store: StoreDep,
    owner: OwnerDep,
    state: JobState | None = None,
    # Bounded: Redis ranges are 64-bit, and an offset past any real job count is a bad request.
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    records, total = store.list(owner, state=state, offset=offset, limit=limit)
    return JobList(items=[JobView.of(r) for r in records], total=total, offset=offset, limit=limit)


@router.get("/{job_id}", response_model=JobView, responses=_JOB_ERRORS, summary="Poll a job")
async def get_job(reader: ReaderDep, owner: OwnerDep, job_id: str) -> Response:
    # The hot path of the service (clients poll): on the event loop, one Redis round trip,
    # and the view serialised once by pydantic-core (returning the model would have FastAPI
    # validate it again against response_model first).
    record = await reader.get(job_id) if JOB_ID.match(job_id) else None
    if record is None or record.owner != owner:
        raise ApiError("not_found", f"no job {job_id}")
    return Response(JobView.of(record).model_dump_json(), media_type="application/json")


@router.delete(
    "/{job_id}",
    response_model=JobView,
    responses={**_CANCEL_ERRORS, 202: {"model": JobView, "description": "Cancel requested"}},
    summary="Cancel a job, or delete a finished job's files",
)
def cancel_job(
    store: StoreDep, jobs: JobsDep, response: Response, owner: OwnerDep, job_id: str
) -> JobView:
    """A queued job is cancelled at once (200) and never starts; a running job is flagged
    (202) and stops at its next step, discarding its partial output. A finished job
    (succeeded, failed or cancelled) has its uploads and artifacts removed (200): the record
    stays, with ``expired_at`` set and ``expired_reason`` 'deleted', and its report and
    downloads answer 410 from then on; repeating it is a no-op."""
    record = owned(store, owner, job_id)
    if record.state.terminal:
        return JobView.of(jobs.delete_files(record))
    updated = jobs.cancel(record)
    if updated.state is JobState.running:
        response.status_code = 202
    return JobView.of(updated)


@router.get(
    "/{job_id}/report",
    response_model=CompressionReport,
    responses=_RESULT_ERRORS,
    summary="The compression report of a succeeded job",
)
def get_report(store: StoreDep, storage: StorageDep, owner: OwnerDep, job_id: str) -> Response:
    record = owned(store, owner, job_id)
    _succeeded(record)
    # Served as stored (validated when the job finished), not re-serialised.
    found = storage.artifact_file(job_id, "report.json")
    if found is not None:
        return FileResponse(found[0], media_type="application/json")
    raw = storage.read_artifact(job_id, "report.json") if storage.remote else None
    if raw is None:
        raise ApiError("artifacts_not_available", f"job {job_id} has no report")
    return Response(raw, media_type="application/json")


@router.get(
    "/{job_id}/artifacts",
    response_model=ArtifactList,
    responses=_RESULT_ERRORS,
    summary="Files of a succeeded job (from its manifest)",
)
def list_artifacts(
    store: StoreDep, storage: StorageDep, owner: OwnerDep, job_id: str
) -> ArtifactList:
    record = owned(store, owner, job_id)
    _succeeded(record)
    manifest = storage.read_manifest(job_id)
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


_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_DOWNLOAD_ERRORS,
    200: {"content": {"application/octet-stream": {}}},
    206: {"description": "The requested byte range (Range header)"},
    304: {"description": "Not modified: If-None-Match named the artifact's ETag"},
    307: {"description": "Redirect to a presigned URL of the object store"},
}


@router.head(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses=_DOWNLOAD_RESPONSES,
    name="artifact_headers",
    summary="One artifact's headers (size, ETag, sha256) without its body",
)
@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses=_DOWNLOAD_RESPONSES,
    summary="Download one artifact (streamed; Range and If-None-Match supported)",
)
def download_artifact(
    request: Request,
    store: StoreDep,
    storage: StorageDep,
    settings: SettingsDep,
    owner: OwnerDep,
    job_id: str,
    name: str,
) -> Response:
    """Streamed (byte ranges honoured; ``ETag`` is the sha256, ``If-None-Match`` answers
    304), or with S3 storage and ``FLOW_COMPRESS_DOWNLOAD_REDIRECT`` a 307 to a presigned URL
    of the store."""
    record = owned(store, owner, job_id)
    _succeeded(record)
    return artifact_response(storage, settings, job_id, name, request.headers)
