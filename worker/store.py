"""The job store: one Redis hash per job plus sorted-set indexes per owner and per state.

This store is the single source of truth for a job's existence and state; Celery's result
backend is not used. Every state change is a compare-and-set (WATCH/MULTI on the job's hash),
so the API's cancel and the worker's start or finish cannot overwrite each other.

Keys (``p`` is the configured prefix)::

    p job:<id>                 hash: the JobRecord's fields (JSON for nested ones)
    p jobs:<owner>             zset: job ids by creation time
    p jobs:<owner>:<state>     zset: job ids in that state, by creation time
    p idem:<owner>:<key>       string: the job id created under an Idempotency-Key
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import redis

from worker.jobs import JobError, JobRecord, JobState

_JSON_FIELDS = frozenset({"config", "error", "result"})
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StartOutcome(str, Enum):
    """What a delivered task should do with its job."""

    run = "run"  # the job is now running: run it
    skip = "skip"  # missing or already finished (a redelivery): do nothing
    cancelled = "cancelled"  # cancelled before it could run: clean up only
    lost = "lost"  # failed with worker_lost after too many deliveries: clean up only


class JobStore:
    """Typed access to jobs in Redis; every method is one round trip or one transaction."""

    def __init__(self, client: redis.Redis, prefix: str = "flow-compress:") -> None:
        self.r = client
        self.prefix = prefix

    # ------------------------------------------------------------------ keys
    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}jobs:{owner}"

    def _state_key(self, owner: str, state: JobState) -> str:
        return f"{self.prefix}jobs:{owner}:{state.value}"

    # ------------------------------------------------------------------ codec
    @staticmethod
    def _encode(record: JobRecord) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in record.model_dump(mode="json").items():
            if value is None:
                continue
            if name in _JSON_FIELDS:
                out[name] = json.dumps(value, separators=(",", ":"))
            elif isinstance(value, bool):
                out[name] = "1" if value else "0"
            else:
                out[name] = str(value)
        return out

    @staticmethod
    def _decode(raw: dict[str, str]) -> JobRecord:
        data: dict[str, Any] = {}
        for name, value in raw.items():
            if name in _JSON_FIELDS:
                data[name] = json.loads(value)
            elif name == "cancel_requested":
                data[name] = value == "1"
            else:
                data[name] = value
        return JobRecord.model_validate(data)

    # ------------------------------------------------------------------ reads
    def ping(self) -> bool:
        return bool(self.r.ping())

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.r.hgetall(self._job_key(job_id))
        return self._decode(raw) if raw else None  # type: ignore[arg-type]

    def list(
        self, owner: str, *, state: JobState | None = None, offset: int = 0, limit: int = 20
    ) -> tuple[list[JobRecord], int]:
        """Newest first; returns one page and the total count for the filter."""
        index = self._state_key(owner, state) if state else self._owner_key(owner)
        total = int(self.r.zcard(index))  # type: ignore[arg-type]
        ids = self.r.zrevrange(index, offset, offset + limit - 1) if limit > 0 else []
        records = [rec for rec in (self.get(i) for i in ids) if rec is not None]  # type: ignore[union-attr]
        return records, total

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self._job_key(job_id), "cancel_requested") == "1"

    # ------------------------------------------------------------------ writes
    def create(self, record: JobRecord) -> None:
        """Insert a new job; an existing id is a programming error (ids are random)."""
        key = self._job_key(record.id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "id", record.id)
            pipe.hset(key, mapping=self._encode(record))
            pipe.zadd(self._owner_key(record.owner), {record.id: record.created_at})
            pipe.zadd(self._state_key(record.owner, record.state), {record.id: record.created_at})
            created, *_ = pipe.execute()
        if not created:
            raise ValueError(f"job {record.id} already exists")

    def _update(
        self, job_id: str, change: Callable[[JobRecord], dict[str, Any] | None]
    ) -> tuple[JobRecord | None, bool]:
        """Compare-and-set: apply ``change(record)``'s updates atomically.

        ``change`` returns the fields to update, or None to leave the job as it is. Returns the
        job after the call (None if it does not exist) and whether it was changed.
        """
        key = self._job_key(job_id)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hgetall(key)
                    if not raw:
                        pipe.unwatch()
                        return None, False
                    old = self._decode(raw)  # type: ignore[arg-type]
                    updates = change(old)
                    if updates is None:
                        pipe.unwatch()
                        return old, False
                    updates.setdefault("updated_at", time.time())
                    new = old.model_copy(update=updates)
                    # Validate the merged record so a bad update cannot be stored.
                    new = JobRecord.model_validate(new.model_dump())
                    pipe.multi()
                    encoded = self._encode(new)
                    gone = [f for f in self._encode(old) if f not in encoded]
                    if gone:
                        pipe.hdel(key, *gone)
                    pipe.hset(key, mapping=encoded)
                    if new.state is not old.state:
                        pipe.zrem(self._state_key(old.owner, old.state), job_id)
                        pipe.zadd(self._state_key(new.owner, new.state), {job_id: new.created_at})
                    pipe.execute()
                    return new, True
                except redis.WatchError:
                    continue  # someone changed the job between WATCH and EXEC: re-read

    def start(self, job_id: str, *, max_redeliveries: int) -> tuple[StartOutcome, JobRecord | None]:
        """Move a delivered job to running, or say why it must not run.

        A job found ``running`` was being run by a worker that died (the broker redelivered
        it); it is taken over, up to ``max_redeliveries`` times, then fails with worker_lost.
        """
        outcome = StartOutcome.skip

        def change(rec: JobRecord) -> dict[str, Any] | None:
            nonlocal outcome
            now = time.time()
            if rec.state.terminal:
                outcome = StartOutcome.skip
                return None
            if rec.cancel_requested:
                outcome = StartOutcome.cancelled
                return {"state": JobState.cancelled, "finished_at": now, "message": "cancelled"}
            redelivered = rec.state is JobState.running
            if redelivered and rec.redeliveries >= max_redeliveries:
                outcome = StartOutcome.lost
                return {
                    "state": JobState.failed,
                    "finished_at": now,
                    "error": JobError(
                        code="worker_lost",
                        message=f"the worker running this job died {rec.redeliveries + 1} times",
                    ),
                }
            outcome = StartOutcome.run
            return {
                "state": JobState.running,
                "attempts": rec.attempts + 1,
                "redeliveries": rec.redeliveries + int(redelivered),
                "started_at": rec.started_at or now,
                "message": "restarted after a lost worker" if redelivered else "started",
            }

        record, _ = self._update(job_id, change)
        return (outcome if record is not None else StartOutcome.skip), record

    def progress(self, job_id: str, **fields: Any) -> bool:
        """Record progress of a running job (ignored once the job has left ``running``)."""
        _, changed = self._update(
            job_id, lambda rec: dict(fields) if rec.state is JobState.running else None
        )
        return changed

    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        error: JobError | None = None,
        result: dict[str, float] | None = None,
        message: str = "",
    ) -> bool:
        """Move an unfinished job to a terminal state; a finished job is left as it is."""
        if not state.terminal:
            raise ValueError(f"{state} is not a terminal state")

        def change(rec: JobRecord) -> dict[str, Any] | None:
            if rec.state.terminal:
                return None
            updates: dict[str, Any] = {
                "state": state,
                "finished_at": time.time(),
                "error": error,
                "message": message or state.value,
            }
            if result is not None:
                updates["result"] = result
            if state is JobState.succeeded:
                updates["percent"] = 100.0
            return updates

        _, changed = self._update(job_id, change)
        return changed

    def requeue(self, job_id: str, message: str) -> bool:
        """Put a running job back to ``queued`` before a retry of a transient failure."""
        _, changed = self._update(
            job_id,
            lambda rec: (
                {"state": JobState.queued, "message": message}
                if rec.state is JobState.running
                else None
            ),
        )
        return changed

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel: a queued job becomes ``cancelled`` now and never starts; a running job is
        flagged and stops at its next step boundary; a finished job is left as it is."""

        def change(rec: JobRecord) -> dict[str, Any] | None:
            if rec.state is JobState.queued:
                return {
                    "state": JobState.cancelled,
                    "cancel_requested": True,
                    "finished_at": time.time(),
                    "message": "cancelled before it started",
                }
            if rec.state is JobState.running and not rec.cancel_requested:
                return {"cancel_requested": True, "message": "cancel requested"}
            return None

        record, _ = self._update(job_id, change)
        return record

    def claim_idempotency_key(self, owner: str, key: str, job_id: str, ttl_s: int) -> str | None:
        """Bind ``key`` to ``job_id`` unless it is bound already; return the earlier job id."""
        name = f"{self.prefix}idem:{owner}:{key}"
        if self.r.set(name, job_id, nx=True, ex=ttl_s):
            return None
        return self.r.get(name)  # type: ignore[return-value]

    def release_idempotency_key(self, owner: str, key: str, job_id: str) -> None:
        """Unbind ``key`` if it still names ``job_id`` (its creation failed; allow a retry)."""
        self.r.eval(_DELETE_IF_EQUAL, 1, f"{self.prefix}idem:{owner}:{key}", job_id)

    def idempotent_job(self, owner: str, key: str) -> str | None:
        return self.r.get(f"{self.prefix}idem:{owner}:{key}")  # type: ignore[return-value]
