"""Every API error: a stable snake_case code, mapped to an HTTP status in one place.

The body is always ``{"error": {"code", "message", "field", "details"}}``. Library error codes
(``flow_compress.errors``) that describe a bad request map to 422 here; when the same codes
end a job they appear in the job's ``error`` instead, with the HTTP request itself succeeding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from flow_compress.errors import ErrorCode, FlowCompressError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5

STATUS_BY_CODE: dict[str, int] = {
    # the API's own codes
    "bad_request": 400,
    "invalid_multipart": 400,
    "invalid_range": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "artifacts_not_available": 409,
    "artifacts_expired": 410,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "range_not_satisfiable": 416,
    "validation_error": 422,
    "idempotency_key_reused": 422,
    "weights_not_found": 422,
    "job_too_large": 422,
    "download_not_allowed": 422,
    "invalid_webhook_url": 422,
    "webhook_host_not_allowed": 422,
    "quota_exceeded": 429,
    "invalid_archive": 422,
    "broker_unavailable": 503,
    "preflight_busy": 503,
    "storage_unavailable": 503,
    # every library and job code (flow_compress.errors.ErrorCode); most end jobs rather than
    # requests, but a request refused by the library gets the same status as a job would
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.INVALID_CONFIG: 422,
    ErrorCode.UNSUPPORTED_MODEL: 422,
    ErrorCode.BAD_CHECKPOINT: 422,
    ErrorCode.WEIGHTS_NOT_AVAILABLE: 422,
    ErrorCode.DATASET_NOT_FOUND: 422,
    ErrorCode.INVALID_DATASET: 422,
    ErrorCode.BUDGET_EXCEEDED: 422,
    ErrorCode.GUARANTEE_EXCEEDED: 422,
    ErrorCode.EXPORT_PARITY_FAILED: 422,
    ErrorCode.QUANTIZATION_PARITY_FAILED: 422,
    ErrorCode.DEPLOYMENT_UNAVAILABLE: 422,
    ErrorCode.INVALID_FID_INPUT: 422,
    ErrorCode.EXPORT_FAILED: 500,
    ErrorCode.QUANTIZATION_FAILED: 500,
    ErrorCode.CANCELLED: 409,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.OUT_OF_MEMORY: 507,
    ErrorCode.ARTIFACT_CORRUPT: 500,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
}
_unmapped = [c.value for c in ErrorCode if c not in STATUS_BY_CODE]
if _unmapped:  # a new library code must be given a status here, never a silent 500
    raise RuntimeError(f"api.errors.STATUS_BY_CODE misses error codes {_unmapped}")


def status_for(code: str) -> int:
    """The HTTP status of an error code; an unknown code is a bug (``KeyError``)."""
    try:
        return STATUS_BY_CODE[code]
    except KeyError:
        raise KeyError(f"error code {code!r} has no HTTP status in api.errors") from None


class FieldError(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str
    message: str


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str
    message: str
    field: str | None = None
    details: list[FieldError] = []


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


def documented(*codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route that may answer with these error ``codes``.

    Statuses come from ``STATUS_BY_CODE``, so the spec cannot drift from the handlers; every
    route also declares 500 and 503 (the job store can be away at any time). The descriptions
    list the codes a client may see under each status.
    """
    by_status: dict[int, list[str]] = {}
    for code in (*codes, "broker_unavailable", "internal_error"):
        by_status.setdefault(status_for(code), []).append(code)
    return {
        status: {"model": ErrorBody, "description": "Error codes: " + ", ".join(sorted(names))}
        for status, names in sorted(by_status.items())
    }


class ApiError(Exception):
    """Raise anywhere in the API; the handler renders it with the code's status."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        details: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        status_for(code)  # an unknown code fails where the error is raised, not when rendered
        self.code = code
        self.message = message
        self.field = field
        self.details = list(details)
        self.headers = headers

    @property
    def status(self) -> int:
        return status_for(self.code)

    @classmethod
    def from_library(cls, exc: FlowCompressError, field: str | None = None) -> ApiError:
        return cls(exc.code, exc.message, field=field)

    @classmethod
    def from_validation(cls, exc: ValidationError, prefix: str) -> ApiError:
        """A pydantic error on a request model; ``field`` is the dotted path of the first."""
        details = [
            FieldError(field=_dotted(prefix, err["loc"]), message=err["msg"])
            for err in exc.errors(include_url=False)
        ]
        first = details[0] if details else FieldError(field=prefix, message=str(exc))
        return cls("validation_error", first.message, field=first.field, details=details)


def _dotted(prefix: str, loc: Sequence[Any]) -> str:
    parts = [prefix] if prefix else []
    parts += [str(p) for p in loc]
    return ".".join(parts)


def error_response(err: ApiError) -> JSONResponse:
    body = ErrorBody(
        error=ErrorDetail(code=err.code, message=err.message, field=err.field, details=err.details)
    )
    return JSONResponse(body.model_dump(), status_code=err.status, headers=err.headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through ``error_response`` so clients see one error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(FlowCompressError)
    async def _library_error(_: Request, exc: FlowCompressError) -> JSONResponse:
        return error_response(ApiError.from_library(exc))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            FieldError(field=_dotted("", err["loc"]), message=err["msg"]) for err in exc.errors()
        ]
        first = details[0] if details else FieldError(field="", message="invalid request")
        return error_response(
            ApiError("validation_error", first.message, field=first.field, details=details)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "bad_request")
        err = ApiError(code, str(exc.detail), headers=getattr(exc, "headers", None))
        response = error_response(err)
        response.status_code = exc.status_code
        return response

    async def _store_unreachable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("job store unavailable: %s", exc)
        # Every request opens or reuses a pooled connection, so the API recovers by itself as
        # soon as Redis answers again; Retry-After tells clients when to try.
        return error_response(
            ApiError(
                "broker_unavailable",
                "the job store is unreachable; retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        )

    app.add_exception_handler(redis.ConnectionError, _store_unreachable)
    app.add_exception_handler(redis.TimeoutError, _store_unreachable)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # The client aborted its own request (a cancelled upload): nothing went wrong here,
        # and nobody will read this answer. One line, no traceback.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return error_response(ApiError("bad_request", "the client disconnected"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(ApiError("internal_error", "internal server error"))
