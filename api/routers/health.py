"""Health probes: liveness and readiness (Redis reachable, storage writable)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.deps import StorageDep, StoreDep
from api.errors import ApiError, documented
from api.schemas import Health

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process serves")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses=documented("storage_unavailable"),
    summary="Readiness: Redis (broker and job store) reachable, storage writable",
)
async def readyz(store: StoreDep, storage: StorageDep) -> Health:
    """Unauthenticated: answers say what is wrong, never where (no socket path, host or
    folder); the details go to the server's log."""
    try:
        await run_in_threadpool(store.ping)
    except Exception as exc:
        log.warning("readiness: Redis is unreachable: %s", exc)
        raise ApiError("broker_unavailable", "Redis is unreachable") from None
    try:
        await run_in_threadpool(storage.check)
    except Exception as exc:  # StorageUnavailableError, or a store refusing our credentials
        # The reason goes to the operator's log; an unauthenticated probe learns no location.
        log.warning("readiness: storage %s is unavailable: %s", storage.url, exc)
        raise ApiError("storage_unavailable", "the storage is unavailable") from None
    return Health(status="ready", checks={"broker": "ok", "storage": "ok"})
