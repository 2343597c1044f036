"""The job store: one Redis hash per job plus sorted-set indexes per owner and per state.

This store is the single source of truth for a job's existence and state; Celery's result
backend is not used. Every state change is a compare-and-set (WATCH/MULTI on the job's hash),
so the API's cancel and the worker's start or finish cannot overwrite each other.

Keys (``p`` is the configured prefix)::

    p job:<id>                 hash: the JobRecord's fields (JSON for nested ones)
    p jobs:<owner>             zset: job ids by creation time
    p jobs:<owner>:<state>     zset: job ids in that state, by creation time
    p idem:<owner>:<key>       string: "<job id> <request fingerprint>" of an Idempotency-Key
    p finished                 zset: finished jobs whose files are not yet removed, by
                               finish time (the retention cleaner's work list)
    p jobs-in:<state>          zset: every owner's job ids in that state (metrics count them)
    p webhooks:due             zset: job ids whose webhook delivery is pending, by due time
    p jobs-in:indexed          string: set once the jobs-in indexes cover jobs stored before
                               they existed (``index_states``)
    p events:<id>, logs:<id>   streams: progress events and log lines (``worker.events``)

Every committed change of a job also appends its ``JobEvent`` to the job's event stream, in the
same transaction, so live readers (``GET /v1/jobs/{id}/events``) never miss a state.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import weakref
from collections.abc import Callable
from enum import Enum
from typing import Any

import redis
import redis.asyncio

from flow_compress.config import CompressionConfig
from worker.events import DEFAULT_TTL_S, JobStreams
from worker.jobs import JobError, JobRecord, JobState
from worker.notify import REVEAL_SECRETS, WebhookDelivery

_JSON_FIELDS = frozenset({"config", "error", "result", "notify", "delivery"})
# Put one job into the jobs-in:<state> index its hash says, and out of the others; atomic, so
# it cannot undo a concurrent state change (which moves the job in the same transaction).
_INDEX_STATE = """
local state = redis.call('HGET', KEYS[1], 'state')
local created = redis.call('HGET', KEYS[1], 'created_at') or '0'
for i = 2, #KEYS do
  if state and KEYS[i] == ARGV[1] .. state then
    redis.call('ZADD', KEYS[i], created, ARGV[2])
  else
    redis.call('ZREM', KEYS[i], ARGV[2])
  end
end
return state
"""
# The binding is "<job id> <request fingerprint>": delete it if it names job ARGV[1].
_DELETE_IF_BOUND_TO = """
local bound = redis.call('GET', KEYS[1])
if bound and (bound == ARGV[1] or string.sub(bound, 1, #ARGV[1] + 1) == ARGV[1] .. ' ') then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@functools.lru_cache(maxsize=4096)
def _config(raw: str) -> CompressionConfig:
    """A stored config, parsed once: validating the nested config is most of the cost of
    reading a job (a status poll), it never changes after submission, and the model is
    frozen, so one instance can be shared by every read of the same JSON."""
    return CompressionConfig.model_validate_json(raw)


class StartOutcome(str, Enum):
    """What a delivered task should do with its job."""

    run = "run"  # the job is now running: run it
    skip = "skip"  # missing or already finished (a redelivery): do nothing
    cancelled = "cancelled"  # cancelled before it could run: clean up only
    lost = "lost"  # failed with worker_lost after too many deliveries: clean up only


class JobStore:
    """Typed access to jobs in Redis; every method is one round trip or one transaction."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "flow-compress:",
        *,
        events_ttl_s: int = DEFAULT_TTL_S,
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.streams = JobStreams(prefix, ttl_s=events_ttl_s)

    # ------------------------------------------------------------------ keys
    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}jobs:{owner}"

    def _state_key(self, owner: str, state: JobState) -> str:
        return f"{self.prefix}jobs:{owner}:{state.value}"

    @property
    def finished_key(self) -> str:
        return f"{self.prefix}finished"

    def _all_in_state_key(self, state: JobState) -> str:
        return f"{self.prefix}jobs-in:{state.value}"

    @property
    def webhooks_due_key(self) -> str:
        return f"{self.prefix}webhooks:due"

    # ------------------------------------------------------------------ codec
    @staticmethod
    def _encode(record: JobRecord) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in record.model_dump(mode="json", context=REVEAL_SECRETS).items():
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
            if name == "config":
                data[name] = _config(value)
            elif name in _JSON_FIELDS:
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

    def count_by_state(self) -> dict[JobState, int]:
        """Jobs of every owner in each state (one round trip; see ``index_states``)."""
        with self.r.pipeline(transaction=False) as pipe:
            for state in JobState:
                pipe.zcard(self._all_in_state_key(state))
            counts = pipe.execute()
        return {state: int(n) for state, n in zip(JobState, counts, strict=True)}

    def index_states(self, batch: int = 1000) -> int:
        """Fill the jobs-in:<state> indexes from the job hashes, once per Redis database
        (jobs stored before the indexes existed); returns the jobs indexed now. Safe while
        jobs change state, and safe to run from several processes."""
        marker = f"{self.prefix}jobs-in:indexed"
        if self.r.exists(marker):
            return 0
        index_keys = [self._all_in_state_key(s) for s in JobState]
        job_prefix = self._job_key("")
        done = 0
        for key in self.r.scan_iter(match=f"{job_prefix}*", count=batch):
            job_id = key[len(job_prefix) :]  # type: ignore[index]
            self.r.eval(
                _INDEX_STATE,
                1 + len(index_keys),
                key,
                *index_keys,
                f"{self.prefix}jobs-in:",
                job_id,
            )
            done += 1
        self.r.set(marker, "1")
        return done

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
            pipe.zadd(self._all_in_state_key(record.state), {record.id: record.created_at})
            self.streams.add_event(pipe, record)
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
                    ended = new.state.terminal and not old.state.terminal
                    if ended and new.notify is not None and new.delivery is None:
                        # The webhook is queued in the same transaction as the end itself:
                        # no end is recorded without its delivery (worker.webhooks).
                        now = time.time()
                        new = new.model_copy(
                            update={"delivery": WebhookDelivery.pending_for(new.state.value, now)}
                        )
                    else:
                        ended = False
                    pipe.multi()
                    encoded = self._encode(new)
                    gone = [f for f in self._encode(old) if f not in encoded]
                    if gone:
                        pipe.hdel(key, *gone)
                    pipe.hset(key, mapping=encoded)
                    if new.state is not old.state:
                        pipe.zrem(self._state_key(old.owner, old.state), job_id)
                        pipe.zadd(self._state_key(new.owner, new.state), {job_id: new.created_at})
                        if new.state.terminal and not old.state.terminal:
                            pipe.zadd(self.finished_key, {job_id: new.finished_at or time.time()})
                        pipe.zrem(self._all_in_state_key(old.state), job_id)
                        pipe.zadd(self._all_in_state_key(new.state), {job_id: new.created_at})
                    if ended:
                        pipe.zadd(self.webhooks_due_key, {job_id: now})
                    self.streams.add_event(pipe, new)
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
        result: dict[str, float | bool] | None = None,
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

    def requeue_lost(self, job_id: str, *, max_redeliveries: int) -> JobRecord | None:
        """The process running ``job_id`` died (killed, out of memory): put the job back to
        ``queued`` with the reason, counting one more redelivery, or, once it has been
        redelivered ``max_redeliveries`` times, fail it with ``worker_lost`` (a job that
        kills its worker every time must not loop forever). Only a running job changes;
        returns it afterwards, or None when nothing changed."""

        def change(rec: JobRecord) -> dict[str, Any] | None:
            if rec.state is not JobState.running:
                return None
            if rec.redeliveries >= max_redeliveries:
                return {
                    "state": JobState.failed,
                    "finished_at": time.time(),
                    "error": JobError(
                        code="worker_lost",
                        message=f"the worker running this job died {rec.redeliveries + 1} times",
                    ),
                }
            return {
                "state": JobState.queued,
                "redeliveries": rec.redeliveries + 1,
                "message": "worker lost; requeued at the head of the queue",
            }

        record, changed = self._update(job_id, change)
        return record if changed else None

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

    def _idem_key(self, owner: str, key: str) -> str:
        return f"{self.prefix}idem:{owner}:{key}"

    def mark_expired(self, job_id: str, reason: str) -> JobRecord | None:
        """Mark a finished job's files as gone (``expired_at``, kept if already set); an
        unfinished job is left as it is. Returns the job afterwards."""

        def change(rec: JobRecord) -> dict[str, Any] | None:
            if not rec.state.terminal or rec.expired_at is not None:
                return None
            return {"expired_at": time.time(), "expired_reason": reason}

        record, _ = self._update(job_id, change)
        return record

    def set_delivery(self, job_id: str, delivery: WebhookDelivery) -> bool:
        """Record a webhook attempt's outcome (the job's ``updated_at`` is left alone)."""
        _, changed = self._update(
            job_id, lambda rec: {"delivery": delivery, "updated_at": rec.updated_at}
        )
        return changed

    def release_idempotency_key(self, owner: str, key: str, job_id: str) -> None:
        """Unbind ``key`` if it still names ``job_id`` (its creation failed; allow a retry)."""
        self.r.eval(_DELETE_IF_BOUND_TO, 1, self._idem_key(owner, key), job_id)

    def idempotent_job(self, owner: str, key: str) -> str | None:
        """The job id bound to an Idempotency-Key, if any."""
        bound = self.r.get(self._idem_key(owner, key))
        return str(bound).partition(" ")[0] if bound else None


class AsyncJobReader:
    """The API's hot read path (a status poll): one HGETALL on ``redis.asyncio``, so a poll
    never leaves the event loop for a worker thread.

    Keys and decoding are ``JobStore``'s. An asyncio client belongs to the event loop it
    first ran on, so there is one client per running loop (one in a server; test clients and
    in-process conformance runs may start several).
    """

    def __init__(
        self,
        url: str,
        prefix: str = "flow-compress:",
        max_connections: int = 32,
        timeout_s: float = 30,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # A bounded pool that makes a request wait for a free connection, however long
            # (as requests queued for the worker threads before): under a burst an unbounded
            # one opens hundreds of connections at once, which costs more than the commands
            # and can overflow the server's accept backlog. asyncio timeouts count the time
            # the event loop spends on other requests, so under a burst a 5-second connect
            # timeout fires against a healthy Redis: the connect timeout here is the
            # command timeout (a Redis that is down refuses the connection at once anyway).
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=None,
                decode_responses=True,
                socket_connect_timeout=self.timeout_s,
                socket_timeout=self.timeout_s,
                health_check_interval=30,
            )
            client = redis.asyncio.Redis.from_pool(pool)  # owns the pool: aclose closes it
            self._clients[loop] = client
        return client

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._client().hgetall(f"{self.prefix}job:{job_id}")  # JobStore._job_key
        return JobStore._decode(raw) if raw else None

    async def aclose(self) -> None:
        """Close this loop's client (the lifespan's end)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()
