"""Prometheus metrics of the service, exposed by the API at ``/metrics``.

Two sources, one registry per application (so several apps in one process, as in the tests,
never share or clash):

- ``RequestMetrics``, an ASGI middleware: requests and their latency by method, route
  template (``/v1/jobs/{job_id}``, never the raw path, so label values stay few) and status.
- ``ServiceCollector``, read at scrape time: jobs by state, queue depth, live and busy
  workers and the stage-duration histogram (all from Redis, where workers on any machine
  write them: ``worker.telemetry``), and the storage folder's size by area (walked at most
  every ``metrics_storage_interval_s``).

Metric names are documented in the README ("Metrics").

With several API processes (``flow-compress serve --api-processes N``) each process keeps its
request counters in files under ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess
mode, chosen when that variable is set as prometheus_client is first imported), and a scrape,
answered by whichever process accepts it, adds every process's up. The ``process_*`` metrics
describe one process, so that mode leaves them out.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, multiprocess
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.storage import Storage
from worker.store import JobStore
from worker.telemetry import live_workers, read_stage_histograms, stage_key

log = logging.getLogger(__name__)

NAMESPACE = "flow_compress"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for it
# Request latency buckets (seconds): a status poll takes milliseconds, an upload seconds.
REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"
# kombu's Redis transport keeps one list per priority step; messages without a priority
# (ours) go to the queue's own list, the others to "<queue>\x06\x16<priority>".
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)


def route_template(scope: Scope) -> str:
    """The matched route's path template, or UNMATCHED.

    FastAPI's routes put themselves in the scope as they match; Starlette's own (the OpenAPI
    document, the docs page, mounts) do not, so for those the app's routes are matched again
    (only then: an unknown path, or one of those few).
    """
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    for route in getattr(scope.get("app"), "routes", ()):
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route that cannot match this scope at all
            continue
        if match is Match.FULL:
            return str(getattr(route, "path", UNMATCHED))
    return UNMATCHED


class RequestMetrics:
    """Pure ASGI middleware (no per-request Request object, no task): counts and times each
    HTTP request once its response has been sent."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        # Label children cached by label values: ``labels()`` takes a lock and builds a key.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception that escapes every handler ends as a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            key = (method, route_template(scope), str(status))
            children = self._children.get(key)
            if children is None:
                children = (self.requests.labels(*key), self.latency.labels(*key))
                self._children[key] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - start)


class FolderSizes:
    """Bytes under each top-level folder of the storage root, recomputed at most every
    ``interval_s`` (a walk of a large tree takes a while; a scrape must stay cheap)."""

    def __init__(self, root: Path, interval_s: float) -> None:
        self.root = root
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._sizes: dict[str, int] = {}

    def get(self) -> dict[str, int]:
        with self._lock:
            if time.monotonic() - self._at >= self.interval_s:
                self._sizes = self._walk()
                self._at = time.monotonic()
            return dict(self._sizes)

    def _walk(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return sizes
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                sizes[entry.name] = _tree_bytes(entry.path)
        return sizes


def _tree_bytes(path: str) -> int:
    """Bytes of regular files under ``path``; symlinks are not followed, and files that
    vanish during the walk (a job finishing) are skipped."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


class ServiceCollector(Collector):
    """The service's state, read from Redis and the storage folder at each scrape."""

    def __init__(
        self, store: JobStore, queue: str, storage: Storage, storage_interval_s: float
    ) -> None:
        self.store = store
        self.queue = queue
        self.sizes = FolderSizes(storage.root, storage_interval_s)
        self._indexed = False

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{NAMESPACE}_store_up", "1 if the job store (Redis) answered this scrape, else 0."
        )
        try:
            families = list(self._from_redis())
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("metrics: the job store is unreachable: %s", exc)
            families = []
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        yield up
        yield from families
        storage = GaugeMetricFamily(
            f"{NAMESPACE}_storage_bytes",
            "Bytes stored under the storage folder, by top-level area "
            "(uploads, scratch, artifacts, datasets, redis).",
            labels=["area"],
        )
        for area, size in sorted(self.sizes.get().items()):
            storage.add_metric([area], size)
        yield storage

    def _from_redis(self) -> Iterator[Metric]:
        r, prefix = self.store.r, self.store.prefix
        if not self._indexed:
            # Jobs stored before the per-state indexes existed: index them once.
            self.store.index_states()
            self._indexed = True
        queue_key = f"{prefix}celery:{self.queue}"  # kombu's global_keyprefix + queue name
        with r.pipeline(transaction=False) as pipe:
            for step in _KOMBU_PRIORITY_STEPS:
                pipe.llen(queue_key if step == 0 else f"{queue_key}{_KOMBU_PRIORITY_SEP}{step}")
            pipe.hgetall(stage_key(prefix))
            *lengths, stage_raw = pipe.execute()

        jobs = GaugeMetricFamily(
            f"{NAMESPACE}_jobs", "Jobs in the job store, by state.", labels=["state"]
        )
        for state, count in self.store.count_by_state().items():
            jobs.add_metric([state.value], count)
        yield jobs

        depth = GaugeMetricFamily(
            f"{NAMESPACE}_queue_depth",
            "Task messages waiting in the Celery queue (not yet taken by a worker).",
            labels=["queue"],
        )
        depth.add_metric([self.queue], sum(int(n) for n in lengths))
        yield depth

        beats = live_workers(r, prefix)
        workers = GaugeMetricFamily(
            f"{NAMESPACE}_workers",
            "Workers whose heartbeat is current, by queue.",
            labels=["queue"],
        )
        busy = GaugeMetricFamily(
            f"{NAMESPACE}_workers_busy", "Workers running a job now, by queue.", labels=["queue"]
        )
        queues = sorted({b.queue for b in beats} | {self.queue})
        for queue in queues:
            workers.add_metric([queue], sum(1 for b in beats if b.queue == queue))
            busy.add_metric([queue], sum(1 for b in beats if b.queue == queue and b.busy))
        yield workers
        yield busy

        stages = HistogramMetricFamily(
            f"{NAMESPACE}_stage_duration_seconds",
            "Wall time of each completed pipeline stage of a job, observed by the worker when "
            "the stage ends.",
            labels=["stage"],
        )
        for hist in read_stage_histograms(stage_raw):
            stages.add_metric([hist.stage], hist.buckets, hist.sum)
        yield stages


class Metrics:
    """The registry of one application and what feeds it."""

    def __init__(
        self, store: JobStore, queue: str, storage: Storage, storage_interval_s: float
    ) -> None:
        self.registry = CollectorRegistry()
        shared_dir = os.environ.get(METRICS_DIR_ENV)
        # Shared: the counters live in the folder's files, read back for every process by
        # the MultiProcessCollector; registered here as well they would count this one twice.
        own = None if shared_dir else self.registry
        labels = ["method", "route", "status"]
        self.requests = Counter(
            f"{NAMESPACE}_http_requests",
            "HTTP requests answered, by method, route template and status.",
            labels,
            registry=own,
        )
        self.latency = Histogram(
            f"{NAMESPACE}_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by method, route "
            "template and status.",
            labels,
            buckets=REQUEST_BUCKETS,
            registry=own,
        )
        self.registry.register(ServiceCollector(store, queue, storage, storage_interval_s))
        if shared_dir:
            multiprocess.MultiProcessCollector(self.registry, path=shared_dir)
        else:
            ProcessCollector(namespace=NAMESPACE, registry=self.registry)


__all__ = ["METRICS_DIR_ENV", "Metrics", "RequestMetrics", "ServiceCollector", "route_template"]
