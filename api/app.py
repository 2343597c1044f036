"""The FastAPI application factory (``uvicorn --factory api.app:create_app``)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.errors import install_error_handlers
from api.hashing import FileHasher
from api.jobs import JobService
from api.metrics import Metrics, RequestMetrics
from api.preflight import PreflightService
from api.routers import docs, events, health, jobs, metrics, preflight, usage, web
from api.routers.metrics import METRICS_PATH, METRICS_SCHEME
from api.schemas import JobSpec
from api.security import SecurityHeaders
from api.settings import ApiSettings
from api.streams import EventReader
from worker.broker import redis_client
from worker.celery_app import create_celery
from worker.storage import open_storage
from worker.store import AsyncJobReader, JobStore

VERSION = "1"


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the API for ``settings`` (read from the environment when omitted)."""
    settings = settings or ApiSettings()
    if not settings.redis_url:
        raise ValueError(
            "FLOW_COMPRESS_REDIS_URL is not set (`flow-compress serve` starts an embedded Redis)"
        )
    storage = open_storage(settings)
    client = redis_client(settings.redis_url, timeout_s=settings.redis_timeout_s)
    store = JobStore(client, settings.key_prefix, events_ttl_s=settings.events_ttl_s)
    # A frozen Redis must cost a poll about redis_timeout_s, not the reader's default 30 s.
    # asyncio timers also count time the loop spends on other requests: under a burst of
    # thousands of polls a very small value can fire against a healthy Redis, so raise
    # FLOW_COMPRESS_REDIS_TIMEOUT_S rather than lower it on a busy server.
    reader = AsyncJobReader(
        settings.redis_url, settings.key_prefix, timeout_s=settings.redis_timeout_s
    )
    celery = create_celery(settings)
    hasher = FileHasher(client, settings.key_prefix)
    service_metrics = Metrics(store, settings.queue, storage, settings.metrics_storage_interval_s)
    events_reader = EventReader(settings.redis_url, store.streams)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        storage.ensure()
        # What exists at startup (modules, routes, schemas: ~100k objects) lives as long as
        # the process, yet every full collection walked it: a 50-150 ms stall of the event
        # loop on a busy 2-core machine, several times a minute under steady polling
        # (BENCHMARKS.md §4). Frozen, it is out of the collector's sight; unfrozen at
        # shutdown so an app built and dropped in a longer-lived process (the tests) can
        # still be collected.
        gc.collect()
        gc.freeze()
        yield
        gc.unfreeze()
        hasher.close()
        await reader.aclose()
        client.close()

    app = FastAPI(
        title="flow-compress",
        version=VERSION,
        summary="Compress trained PyTorch vision models with IDAP++.",
        lifespan=lifespan,
        # Served by api.routers.docs: behind the keys, with scripts shipped locally.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.reader = reader
    app.state.metrics = service_metrics
    app.state.storage = storage
    app.state.jobs = JobService(settings, store, storage, celery, hasher)
    app.state.preflight = PreflightService(settings, app.state.jobs)
    app.state.events = events_reader
    install_error_handlers(app)
    app.add_middleware(SecurityHeaders)
    app.include_router(jobs.router)
    app.include_router(preflight.router)
    app.include_router(health.router)
    app.include_router(docs.router)
    app.include_router(usage.router)
    app.include_router(metrics.router)
    app.add_middleware(
        RequestMetrics, requests=service_metrics.requests, latency=service_metrics.latency
    )
    app.include_router(events.router)
    app.include_router(web.router)
    app.mount("/static", web.static_files(), name="static")
    _document_job_spec(app, settings)
    return app


def _document_job_spec(app: FastAPI, settings: ApiSettings) -> None:
    """Put JobSpec (the JSON body of POST /v1/jobs, read by hand to allow streaming
    multipart on the same route) into the OpenAPI components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in spec.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components["JobSpec"] = spec
            _declare_errors(schema, keys_required=bool(settings.api_keys))
            _declare_metrics_auth(schema, token_required=settings.metrics_token is not None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_errors(schema: dict[str, Any], *, keys_required: bool) -> None:
    """Make the spec say what this server answers, so clients and conformance checks can
    rely on it: every 422 has the one error body (not FastAPI's default ``detail`` shape), and
    without configured API keys no route requires a key or answers 401."""
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, operations in schema.get("paths", {}).items():
        if path == METRICS_PATH:
            continue  # its own token, not the API keys: _declare_metrics_auth
        for operation in operations.values():
            responses = operation.get("responses", {})
            if "422" in responses:
                responses["422"]["content"] = {"application/json": {"schema": error_ref}}
            if not keys_required:
                operation.pop("security", None)
                responses.pop("401", None)
    components = schema.get("components", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)
    if not keys_required:
        schemes = components.get("securitySchemes", {})
        for name in [n for n in schemes if n != METRICS_SCHEME]:
            del schemes[name]


def _declare_metrics_auth(schema: dict[str, Any], *, token_required: bool) -> None:
    """/metrics requires its bearer token only when the server has one."""
    components = schema.get("components", {})
    if not token_required:
        for operation in schema.get("paths", {}).get(METRICS_PATH, {}).values():
            operation.pop("security", None)
            operation.get("responses", {}).pop("401", None)
        components.get("securitySchemes", {}).pop(METRICS_SCHEME, None)
    if not components.get("securitySchemes", True):
        components.pop("securitySchemes")
