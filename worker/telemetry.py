"""What workers tell the API's ``/metrics`` through Redis: heartbeats and stage durations.

Workers run on other machines and share only Redis with the API, and a job runs in a pool
child that lives for one job, so nothing a worker counts in its own memory would survive to a
scrape. Workers therefore write what they measure into Redis, and the API's collector
(``api.metrics``) reads it at scrape time: one Prometheus target, whatever the number of
workers.

Keys (``p`` is the configured prefix)::

    p metrics:workers           zset: worker hostname -> time of its last heartbeat
    p metrics:worker:<host>     hash: that worker's state (busy, current jobs, pid, ...),
                                expiring after ``HEARTBEAT_TTL_FACTOR`` heartbeat intervals
    p metrics:stage_seconds     hash: a histogram of stage durations, by stage:
                                ``<stage>|<i>`` count in bucket i (not cumulative),
                                ``<stage>|sum``, ``<stage>|count``

The stage histogram is cumulative over the life of the Redis data (as a Prometheus counter
is over a process's life); Prometheus handles resets when Redis loses its data.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from celery import bootsteps

from worker.broker import redis_client
from worker.process import AFTER_POOL

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the stage-duration buckets; +Inf is implied. Stages last from
# seconds (a tiny CPU job) to hours (a large model's recovery on a GPU).
STAGE_BUCKETS: tuple[float, ...] = (
    1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800,
)  # fmt: skip
HEARTBEAT_TTL_FACTOR = 3  # a worker missing this many heartbeats is gone
_SEP = "|"


def workers_key(prefix: str) -> str:
    return f"{prefix}metrics:workers"


def worker_key(prefix: str, hostname: str) -> str:
    return f"{prefix}metrics:worker:{hostname}"


def stage_key(prefix: str) -> str:
    return f"{prefix}metrics:stage_seconds"


# --------------------------------------------------------------------------- stages


def record_stage(client: redis.Redis, prefix: str, stage: str, seconds: float) -> None:
    """Add one stage duration to the shared histogram (one round trip)."""
    index = next((i for i, le in enumerate(STAGE_BUCKETS) if seconds <= le), len(STAGE_BUCKETS))
    key = stage_key(prefix)
    with client.pipeline(transaction=True) as pipe:
        pipe.hincrby(key, f"{stage}{_SEP}{index}", 1)
        pipe.hincrbyfloat(key, f"{stage}{_SEP}sum", seconds)
        pipe.hincrby(key, f"{stage}{_SEP}count", 1)
        pipe.execute()


@dataclass(frozen=True)
class StageHistogram:
    """One stage's histogram as Prometheus wants it: cumulative bucket counts."""

    stage: str
    buckets: list[tuple[str, int]]  # (le, cumulative count), ending with ("+Inf", count)
    sum: float


def read_stage_histograms(raw: dict[str, str]) -> list[StageHistogram]:
    """Decode the ``stage_key`` hash (read by the caller, in its own pipeline)."""
    by_stage: dict[str, dict[str, str]] = {}
    for field, value in raw.items():
        stage, _, part = field.rpartition(_SEP)
        if stage:
            by_stage.setdefault(stage, {})[part] = value
    out = []
    for stage, parts in sorted(by_stage.items()):
        running = 0
        buckets = []
        for i, le in enumerate((*STAGE_BUCKETS, float("inf"))):
            running += int(parts.get(str(i), 0))
            buckets.append(("+Inf" if le == float("inf") else _le(le), running))
        out.append(StageHistogram(stage, buckets, float(parts.get("sum", 0.0))))
    return out


def _le(bound: float) -> str:
    return str(float(bound))


class StageClock:
    """Times the stages of one run from its progress events and records each as it ends.

    A progress event marks the end of a step of its stage, so a stage ends at its last
    event: its duration runs from the end of the stage before (or the start of the run) to
    that event. It is recorded when the next stage's first event arrives, and the last stage
    when the run finishes. A stage cut short (a failure, a cancel, a lost worker) is not
    recorded: the histogram holds the durations of stages that completed. Recording never
    fails the job: a Redis error is logged and the duration dropped.
    """

    def __init__(
        self,
        record: Callable[[str, float], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._record = record
        self._clock = clock
        self._stage: str | None = None
        self._began = clock()
        self._last = self._began

    def event(self, stage: str) -> None:
        now = self._clock()
        if self._stage is not None and stage != self._stage:
            self._emit(self._stage, self._last - self._began)
            self._began = self._last
        self._stage = stage
        self._last = now

    def finish(self) -> None:
        """The run completed: its last stage ended with its last event."""
        if self._stage is not None:
            self._emit(self._stage, self._last - self._began)
            self._stage = None

    def _emit(self, stage: str, seconds: float) -> None:
        try:
            self._record(stage, max(0.0, seconds))
        except redis.RedisError as exc:
            log.warning("could not record the duration of stage %s: %s", stage, exc)


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class WorkerBeat:
    hostname: str
    queue: str
    busy: int  # jobs running now (0 or 1: a worker runs one job at a time)
    jobs: list[str]
    pid: int
    started_at: float
    beat_at: float
    # What deployments it can time latency targets on (worker.capabilities), as JSON.
    deployments: str = ""

    def capabilities(self) -> dict[str, Any] | None:
        if not self.deployments:
            return None
        try:
            caps = json.loads(self.deployments)
        except ValueError:
            return None
        return caps if isinstance(caps, dict) else None


def write_heartbeat(client: redis.Redis, prefix: str, beat: WorkerBeat, interval_s: float) -> None:
    ttl_ms = int(interval_s * HEARTBEAT_TTL_FACTOR * 1000)
    key = worker_key(prefix, beat.hostname)
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(
            key,
            mapping={
                "hostname": beat.hostname,
                "queue": beat.queue,
                "busy": beat.busy,
                "jobs": ",".join(beat.jobs),
                "pid": beat.pid,
                "started_at": beat.started_at,
                "beat_at": beat.beat_at,
                "deployments": beat.deployments,
            },
        )
        pipe.pexpire(key, ttl_ms)
        pipe.zadd(workers_key(prefix), {beat.hostname: beat.beat_at})
        pipe.execute()


def remove_heartbeat(client: redis.Redis, prefix: str, hostname: str) -> None:
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(worker_key(prefix, hostname))
        pipe.zrem(workers_key(prefix), hostname)
        pipe.execute()


def live_workers(client: redis.Redis, prefix: str, now: float | None = None) -> list[WorkerBeat]:
    """Workers whose heartbeat has not expired (two round trips; stale entries dropped)."""
    now = time.time() if now is None else now
    hostnames = client.zrange(workers_key(prefix), 0, -1)
    if not hostnames:
        return []
    with client.pipeline(transaction=False) as pipe:
        for host in hostnames:  # type: ignore[union-attr]
            pipe.hgetall(worker_key(prefix, host))
        raws: list[dict[str, str]] = pipe.execute()
    beats, gone = [], []
    for host, raw in zip(hostnames, raws, strict=True):  # type: ignore[arg-type]
        if not raw:
            gone.append(host)  # its hash expired: it stopped beating
            continue
        beats.append(
            WorkerBeat(
                hostname=raw.get("hostname", host),
                queue=raw.get("queue", ""),
                busy=int(raw.get("busy", 0)),
                jobs=[j for j in raw.get("jobs", "").split(",") if j],
                pid=int(raw.get("pid", 0)),
                started_at=float(raw.get("started_at", 0.0)),
                beat_at=float(raw.get("beat_at", 0.0)),
                deployments=raw.get("deployments", ""),
            )
        )
    if gone:
        client.zrem(workers_key(prefix), *gone)
    return beats


class Heartbeat:
    """A thread in the worker's main process that writes its heartbeat every ``interval_s``.

    The main process stays responsive while a pool child runs a job, and it knows which
    jobs run (``active``, read from Celery's worker state), so the heartbeat says busy or
    idle even when the child is deep in a long stage. A worker that dies stops beating, and
    its entry expires after ``HEARTBEAT_TTL_FACTOR`` intervals; a clean stop removes it.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        hostname: str,
        queue: str,
        interval_s: float,
        active: Callable[[], Iterable[str]],
        capabilities: dict[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.deployments = json.dumps(capabilities) if capabilities is not None else ""
        self.prefix = prefix
        self.hostname = hostname
        self.queue = queue
        self.interval_s = interval_s
        self.active = active
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        jobs = sorted(self.active())
        write_heartbeat(
            self.client,
            self.prefix,
            WorkerBeat(
                hostname=self.hostname,
                queue=self.queue,
                busy=len(jobs),
                jobs=jobs,
                pid=os.getpid(),
                started_at=self.started_at,
                beat_at=time.time(),
                deployments=self.deployments,
            ),
            self.interval_s,
        )

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except redis.RedisError as exc:
                # Redis away: the entry expires and the worker drops out of the metrics
                # until it can beat again, which is what a scrape should say.
                log.debug("heartbeat not written: %s", exc)
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flow-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            remove_heartbeat(self.client, self.prefix, self.hostname)
        except redis.RedisError as exc:
            log.debug("heartbeat not removed: %s", exc)


class HeartbeatStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: the heartbeat runs from the worker's start to its stop."""

    requires = AFTER_POOL  # worker.process: no thread may be mid-import at a fork

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.heartbeat: Heartbeat | None = None

    def start(self, parent: Any) -> None:
        from celery.worker import state

        from worker.capabilities import detect

        settings = parent.app.settings
        # On the main thread, before the heartbeat thread starts (worker.process).
        capabilities = detect()
        self.heartbeat = Heartbeat(
            redis_client(settings.redis_url),
            settings.key_prefix,
            parent.hostname,
            settings.queue,
            settings.heartbeat_interval_s,
            # The main process's set of jobs accepted by the pool and not yet finished;
            # list() of a set runs in C under the GIL, so it is safe from this thread.
            active=lambda: [request.id for request in list(state.active_requests)],
            capabilities=capabilities,
        )
        self.heartbeat.start()

    def stop(self, parent: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat.client.close()
            self.heartbeat = None


__all__ = [
    "STAGE_BUCKETS",
    "Heartbeat",
    "HeartbeatStep",
    "StageClock",
    "StageHistogram",
    "WorkerBeat",
    "live_workers",
    "read_stage_histograms",
    "record_stage",
    "stage_key",
]
