"""A job's progress events and log lines, kept in Redis Streams so any API process serves them.

Two streams per job (``p`` is the store's key prefix)::

    p events:<id>    one entry per committed change of the job record: a ``JobEvent``
    p logs:<id>      one entry per log record emitted while a worker ran the job: a ``LogLine``

Events are written by ``JobStore`` in the same MULTI/EXEC transaction as the change itself,
so the stream and the record cannot disagree: whatever state a reader sees in the record, the
event announcing it is already in the stream (the terminal one included). Log lines are written
by ``JobLogHandler``, a ``logging.Handler`` attached to the root logger of the pool child for
the length of one job (``capture_job_logs``).

Both streams are capped (``XADD MAXLEN ~``; the oldest entries go first) and expire
``ttl_s`` seconds after the job's last change or log line. Entry ids are Redis stream ids
(``<ms>-<seq>``): increasing, so a reader resumes after the last id it saw (SSE
``Last-Event-ID``, ``/logs?after=``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from worker.jobs import JobError, JobRecord, JobState

MAX_EVENTS = 2000  # per job: a 100-step job with every retry fits many times over
MAX_LOG_LINES = 5000  # per job
MAX_LOG_CHARS = 8000  # one log line (a traceback included); longer ones are cut
DEFAULT_TTL_S = 7 * 24 * 3600
# A stream id as Redis writes them: milliseconds and a sequence number. Bounded in digits so
# that anything matching is also a valid 64-bit id (Redis refuses larger ones).
STREAM_ID = r"^\d{1,15}-\d{1,9}$"

_FIELD = "json"  # each stream entry holds one field: the model as JSON


class JobEvent(BaseModel):
    """The job's progress after one change (the SSE ``data`` of a ``job`` event)."""

    model_config = ConfigDict(extra="forbid")

    state: JobState
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    percent: float = 0.0
    macs: int | None = Field(None, description="MACs of the model at this step, when measured.")
    top1: float | None = Field(None, description="Validation top-1 at this step, percent.")
    message: str = ""
    cancel_requested: bool = False
    error: JobError | None = None
    result: dict[str, float] | None = None
    time: datetime = Field(..., description="When the change was committed.")

    @classmethod
    def of(cls, record: JobRecord) -> JobEvent:
        return cls(
            state=record.state,
            stage=record.stage,
            step=record.step,
            total_steps=record.total_steps,
            percent=record.percent,
            macs=record.macs,
            top1=record.top1,
            message=record.message,
            cancel_requested=record.cancel_requested,
            error=record.error,
            result=record.result,
            time=datetime.fromtimestamp(record.updated_at, tz=timezone.utc),
        )


class LogLine(BaseModel):
    """One log record of a job's run."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., description="Stream id; pass it as ?after= to read on from here.")
    time: datetime
    level: str
    logger: str
    message: str


class JobStreams:
    """Key names, writers and the synchronous reader of the two streams of each job."""

    def __init__(self, prefix: str, *, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.prefix = prefix
        self.ttl_s = ttl_s

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    def logs_key(self, job_id: str) -> str:
        return f"{self.prefix}logs:{job_id}"

    # ------------------------------------------------------------------ writes
    def add_event(self, pipe: redis.client.Pipeline, record: JobRecord) -> None:
        """Queue the event of ``record`` (as just written) on ``pipe``, a MULTI pipeline."""
        key = self.events_key(record.id)
        pipe.xadd(
            key,
            {_FIELD: JobEvent.of(record).model_dump_json()},
            maxlen=MAX_EVENTS,
            approximate=True,
        )
        pipe.expire(key, self.ttl_s)

    def event_entry(self, record: JobRecord) -> tuple[str, str, str]:
        """The stream key, field and value ``add_event`` writes for ``record``: for callers
        that write the event from a Lua script (``worker.usage.Ledger.create_job``)."""
        return self.events_key(record.id), _FIELD, JobEvent.of(record).model_dump_json()

    def add_log(self, client: redis.Redis, job_id: str, line: dict[str, str]) -> None:
        key = self.logs_key(job_id)
        with client.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {_FIELD: json.dumps(line)}, maxlen=MAX_LOG_LINES, approximate=True)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    # ------------------------------------------------------------------ reads
    def read_logs(
        self, client: redis.Redis, job_id: str, *, after: str | None, limit: int
    ) -> list[LogLine]:
        """Up to ``limit`` log lines after the id ``after`` (from the first when None)."""
        start = f"({after}" if after else "-"
        entries: Any = client.xrange(self.logs_key(job_id), min=start, max="+", count=limit)
        return [LogLine(id=entry_id, **json.loads(fields[_FIELD])) for entry_id, fields in entries]

    @staticmethod
    def decode_event(fields: dict[str, str]) -> str:
        """The JSON of a ``JobEvent`` stream entry, as stored (not re-serialised)."""
        return fields[_FIELD]


class JobLogHandler(logging.Handler):
    """Sends every record it handles to the job's log stream.

    A failure to write (Redis away) is swallowed: a job must never fail because its log could
    not be kept. Records emitted while sending (redis-py's own) are dropped, not recursed into.
    """

    def __init__(
        self, client: redis.Redis, streams: JobStreams, job_id: str, level: int = logging.INFO
    ) -> None:
        super().__init__(level)
        self.client = client
        self.streams = streams
        self.job_id = job_id
        self._sending = threading.local()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._sending, "active", False):
            return
        self._sending.active = True
        try:
            message = self.format(record)
            if len(message) > MAX_LOG_CHARS:
                message = message[: MAX_LOG_CHARS - 1] + "…"
            line = {
                "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(),
                "level": record.levelname,
                "logger": record.name,
                "message": message,
            }
            self.streams.add_log(self.client, self.job_id, line)
        except Exception:
            pass  # see the class docstring: the log is best effort, the job is not
        finally:
            self._sending.active = False


@contextmanager
def capture_job_logs(client: redis.Redis, streams: JobStreams, job_id: str) -> Iterator[None]:
    """Attach a ``JobLogHandler`` to the root logger for the body of the ``with``.

    Records below the loggers' own levels never reach it: the job log holds what the worker's
    log level (``flow-compress worker --loglevel``, INFO by default) lets through, from INFO up.
    """
    handler = JobLogHandler(client, streams, job_id)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


__all__ = [
    "MAX_EVENTS",
    "MAX_LOG_LINES",
    "STREAM_ID",
    "JobEvent",
    "JobLogHandler",
    "JobStreams",
    "LogLine",
    "capture_job_logs",
]
