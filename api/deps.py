"""Typed dependencies of the routes.

Each route names what it needs as an ``Annotated[..., Depends(...)]`` type, so tests (and
operators embedding the app) swap any of them through ``app.dependency_overrides``. The
objects themselves are built once by ``api.app.create_app`` and kept on ``app.state``; these
functions are the only readers of ``app.state``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from api.auth import authenticate, bearer_scheme, header_scheme
from api.jobs import JobService
from api.metrics import Metrics
from api.preflight import PreflightService
from api.settings import ApiSettings
from api.streams import EventReader
from api.uploads import RequestBody, guarded_chunks
from worker.storage import Storage
from worker.store import AsyncJobReader, JobStore

# Every dependency is ``async def`` although none awaits: FastAPI runs a plain ``def``
# dependency in its worker-thread pool, and that hop (a thread switch and the GIL handed back
# and forth) cost more than everything else in a status poll (bench/service.py).


async def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_store(request: Request) -> JobStore:
    return request.app.state.store  # type: ignore[no-any-return]


async def get_reader(request: Request) -> AsyncJobReader:
    return request.app.state.reader  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


async def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs  # type: ignore[no-any-return]


async def get_preflight(request: Request) -> PreflightService:
    return request.app.state.preflight  # type: ignore[no-any-return]


async def get_openapi(request: Request) -> dict[str, Any]:
    return request.app.openapi()  # type: ignore[no-any-return]


async def get_events(request: Request) -> EventReader:
    return request.app.state.events  # type: ignore[no-any-return]


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]


async def get_body(request: Request, settings: SettingsDep) -> RequestBody:
    """The request body, read with the upload timeouts of ``settings``."""
    return RequestBody(
        content_type=request.headers.get("content-type"),
        content_length=request.headers.get("content-length"),
        chunks=guarded_chunks(
            request.stream(),
            idle_timeout_s=settings.upload_idle_timeout_s,
            min_bytes_per_s=settings.upload_min_bytes_per_s,
        ),
    )


async def require_owner(
    request: Request,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    header_key: Annotated[str | None, Depends(header_scheme)],
) -> str:
    """The caller's owner id (see ``api.auth.authenticate``)."""
    return authenticate(settings.api_keys, bearer, header_key, request.headers.get("authorization"))


async def require_docs_access(
    request: Request,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    header_key: Annotated[str | None, Depends(header_scheme)],
) -> None:
    """The API documentation needs a key like any /v1 route, unless ``public_docs``."""
    if not settings.public_docs:
        await require_owner(request, settings, bearer, header_key)


StoreDep = Annotated[JobStore, Depends(get_store)]
ReaderDep = Annotated[AsyncJobReader, Depends(get_reader)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StorageDep = Annotated[Storage, Depends(get_storage)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
PreflightDep = Annotated[PreflightService, Depends(get_preflight)]
EventsDep = Annotated[EventReader, Depends(get_events)]
BodyDep = Annotated[RequestBody, Depends(get_body)]
OwnerDep = Annotated[str, Depends(require_owner)]
DocsAccessDep = Annotated[None, Depends(require_docs_access)]
OpenApiDep = Annotated[dict[str, Any], Depends(get_openapi)]
