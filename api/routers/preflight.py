"""/v1/preflight: what a job would meet, answered before it is queued (``api.preflight``)."""

from __future__ import annotations

import copy

from fastapi import APIRouter

from api.deps import BodyDep, OwnerDep, PreflightDep
from api.errors import documented
from api.routers.jobs import CREATE_BODY
from flow_compress.schema import PreflightReport

# The job's request body without the dataset archive: the preflight reads no data.
PREFLIGHT_BODY = copy.deepcopy(CREATE_BODY)
del PREFLIGHT_BODY["content"]["multipart/form-data"]["schema"]["properties"]["dataset"]

router = APIRouter(prefix="/v1/preflight", tags=["jobs"], responses=documented("unauthorized"))

_ERRORS = documented(
    "bad_request",
    "invalid_multipart",
    "payload_too_large",
    "unsupported_media_type",
    "validation_error",
    "invalid_config",
    "unsupported_model",
    "invalid_dataset",
    "bad_checkpoint",
    "weights_not_found",
    "weights_not_available",
    "job_too_large",
    "invalid_webhook_url",
    "webhook_host_not_allowed",
    "request_timeout",
    "preflight_busy",
    "timeout",
)


@router.post(
    "",
    response_model=PreflightReport,
    responses=_ERRORS,
    openapi_extra={"requestBody": PREFLIGHT_BODY},
    summary="Check a job before submitting it",
)
async def run_preflight(body: BodyDep, preflight: PreflightDep, owner: OwnerDep) -> PreflightReport:
    """The body ``POST /v1/jobs`` takes, without a dataset archive (no data is read).
    Answers 200 with the report whether its checks pass or not (``ok``); an error means the
    check could not run."""
    return await preflight.run(body, owner)
