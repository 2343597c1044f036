"""/metrics: the service's Prometheus metrics (``api.metrics``), in the text format.

Authentication is its own setting, not the API keys: a Prometheus server is not a tenant.
With ``FLOW_COMPRESS_METRICS_TOKEN`` set, a scrape must send ``Authorization: Bearer
<token>``; without it the route is open (then expose the API only where scrapers may reach
it, or put the token in).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from api.deps import MetricsDep, SettingsDep
from api.errors import ApiError, documented

router = APIRouter(tags=["metrics"])
METRICS_PATH = "/metrics"
METRICS_SCHEME = "MetricsToken"

metrics_bearer = HTTPBearer(
    auto_error=False,
    scheme_name=METRICS_SCHEME,
    description="FLOW_COMPRESS_METRICS_TOKEN as a bearer token (when the server sets one).",
)


@router.get(
    METRICS_PATH,
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format",
        },
        **documented("unauthorized"),
    },
    summary="Prometheus metrics (requests, jobs, queue, workers, stages, storage)",
)
async def metrics(
    metrics: MetricsDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(metrics_bearer)],
) -> Response:
    token = settings.metrics_token
    if token is not None:
        presented = credentials.credentials if credentials else ""
        if not hmac.compare_digest(presented.encode(), token.get_secret_value().encode()):
            raise ApiError(
                "unauthorized",
                "the metrics token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
    # Collecting reads Redis with the blocking client and may walk the storage folder:
    # in a worker thread, off the event loop (one scrape a second or so: the hop is cheap).
    body = await run_in_threadpool(generate_latest, metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
