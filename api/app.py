"""The FastAPI application factory (``uvicorn --factory api.app:create_app``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.errors import install_error_handlers
from api.jobs import JobService
from api.routes import health, jobs
from api.schemas import JobSpec
from api.settings import ApiSettings
from worker.broker import redis_client
from worker.celery_app import create_celery
from worker.storage import Storage
from worker.store import JobStore

VERSION = "1"


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the API for ``settings`` (read from the environment when omitted)."""
    settings = settings or ApiSettings()
    if not settings.redis_url:
        raise ValueError(
            "FLOW_COMPRESS_REDIS_URL is not set (`flow-compress serve` starts an embedded Redis)"
        )
    storage = Storage(settings.storage_dir)
    client = redis_client(settings.redis_url)
    store = JobStore(client, settings.key_prefix)
    celery = create_celery(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        storage.ensure()
        yield
        client.close()

    app = FastAPI(
        title="flow-compress",
        version=VERSION,
        summary="Compress trained PyTorch vision models with IDAP++.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.storage = storage
    app.state.jobs = JobService(settings, store, storage, celery)
    install_error_handlers(app)
    app.include_router(jobs)
    app.include_router(health)
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
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_errors(schema: dict[str, Any], *, keys_required: bool) -> None:
    """Make the spec say what this server answers, so clients and conformance checks can
    rely on it: every 422 has the one error body (not FastAPI's default ``detail`` shape), and
    without configured API keys no route requires a key or answers 401."""
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for operations in schema.get("paths", {}).values():
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
        components.pop("securitySchemes", None)
