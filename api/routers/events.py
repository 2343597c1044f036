"""/v1/jobs/{id}/events (Server-Sent Events) and /v1/jobs/{id}/logs: a job as it runs.

Both read Redis Streams that the job store and the worker write (``worker.events``), so any API
process serves any job; the ownership check is the one of every /v1 route (404 for another
owner's job).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import redis
from fastapi import APIRouter, Header, Query, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.deps import EventsDep, OwnerDep, SettingsDep, StoreDep
from api.errors import documented
from api.routers.jobs import owned
from api.schemas import JobLogs
from api.streams import EventReader
from worker.events import STREAM_ID, JobEvent
from worker.jobs import TERMINAL_STATES, JobRecord
from worker.store import JobStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=documented("unauthorized"))

_TERMINAL = frozenset(s.value for s in TERMINAL_STATES)
EVENT = "job"

_EVENTS_DOC = {
    200: {
        "description": (
            "A `text/event-stream`. Each event is `event: job`, `id: <stream id>` and "
            "`data:` a JobEvent as JSON (the job after one change: state, stage, step, "
            "percent, MACs, top-1, message, error, result). It starts with every stored "
            "event after `Last-Event-ID` (all of them without one), follows the job live, "
            "and ends after the event of a terminal state (succeeded, failed, cancelled). "
            "Lines starting with `:` are heartbeats."
        ),
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    204: {
        "description": "The job has ended and nothing is left after `Last-Event-ID`: "
        "stop reconnecting (the SSE convention)."
    },
    **documented("not_found", "validation_error"),
}


def _is_terminal(data: str) -> bool:
    return json.loads(data)["state"] in _TERMINAL


def _final(record: JobRecord) -> ServerSentEvent:
    """The job's end when its stored events are gone (expired): the record says it. Its id
    is the record's last change, so a reconnect with it is answered 204."""
    return ServerSentEvent(
        data=JobEvent.of(record).model_dump_json(),
        event=EVENT,
        id=f"{int(record.updated_at * 1000)}-0",
    )


async def _follow(
    reader: EventReader,
    store: JobStore,
    job_id: str,
    backlog: list[tuple[str, str]],
    after: str,
) -> AsyncIterator[ServerSentEvent]:
    last = after
    entries = backlog
    try:
        while True:
            for entry_id, data in entries:
                yield ServerSentEvent(data=data, event=EVENT, id=entry_id)
                last = entry_id
                if _is_terminal(data):
                    return
            entries = await reader.wait(job_id, last)
            if entries:
                continue
            # Quiet for a while: the terminal event would be in the stream by now if the job
            # had ended (it is written in the same transaction as the state), unless the
            # stream expired or the record was removed. Check, so no stream outlives its job.
            record = await run_in_threadpool(store.get, job_id)
            if record is None:
                return
            if record.state.terminal:
                entries = await reader.backlog(job_id, last)
                if not entries:
                    yield _final(record)
                    return
    except redis.RedisError as exc:
        # Headers are sent: end the stream; the client reconnects with Last-Event-ID.
        log.warning("event stream of job %s ended: Redis: %s", job_id, exc)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    response_model=None,
    responses=_EVENTS_DOC,
    summary="Follow a job: its progress events as Server-Sent Events",
)
async def job_events(
    store: StoreDep,
    reader: EventsDep,
    settings: SettingsDep,
    owner: OwnerDep,
    job_id: str,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            pattern=STREAM_ID,
            description="Resume after this event id (sent by SSE clients on reconnecting).",
        ),
    ] = None,
) -> Response:
    """Resumable: reconnect with ``Last-Event-ID`` and the events missed meanwhile are sent
    first. Events are kept for ``FLOW_COMPRESS_EVENTS_TTL_S`` after the job's last change,
    up to the stream's cap (the oldest go first)."""
    record = await run_in_threadpool(owned, store, owner, job_id)
    after = last_event_id or "0-0"
    backlog = await reader.backlog(job_id, after)
    if record.state.terminal and not backlog:
        if last_event_id is not None:
            return Response(status_code=204)
        backlog = [(f"{int(record.updated_at * 1000)}-0", JobEvent.of(record).model_dump_json())]
    return EventSourceResponse(
        _follow(reader, store, job_id, backlog, after),
        ping=settings.sse_ping_s,
        # no-store: a cached stream is a wrong stream; X-Accel-Buffering: nginx must not
        # hold events back.
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{job_id}/logs",
    response_model=JobLogs,
    responses=documented("not_found", "validation_error"),
    summary="The worker's log lines for a job, oldest first",
)
def job_logs(
    store: StoreDep,
    owner: OwnerDep,
    job_id: str,
    after: Annotated[
        str | None,
        Query(pattern=STREAM_ID, description="Lines after this id (a previous `next_after`)."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> JobLogs:
    """Page through with ``?after=<next_after>`` until fewer than ``limit`` lines come back;
    poll the same way while the job runs. Lines are the records the worker logged while it
    ran the job (INFO and above), kept like the job's events."""
    owned(store, owner, job_id)
    lines = store.streams.read_logs(store.r, job_id, after=after, limit=limit)
    return JobLogs(job_id=job_id, items=lines, next_after=lines[-1].id if lines else after)
