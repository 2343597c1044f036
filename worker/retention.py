"""Retention: finished jobs' files expire; the job record stays, marked expired.

``expire_job`` removes one finished job's uploads, scratch and artifacts and gives their bytes
back to the owner's usage; the record keeps everything else, with ``expired_at`` and
``expired_reason`` (``retention`` or ``deleted``: the owner asked, ``DELETE /v1/jobs/{id}``).
The record is marked first, so from that moment every download answers 410 and no reader can
see a half-removed job; the job leaves the store's ``finished`` work list only once its files
are gone, so a removal cut short (a crash, the store away) is finished by the next sweep.

Where the sweep runs, and why there: a daemon thread in every worker's main process
(``RetentionStep``, a Celery worker bootstep), every ``cleaner_interval_s``. Celery beat would
need one more process to deploy (and exactly one of it), and a cleaning *task* would queue
behind hours-long compressions on the one-job-per-device workers. Any number of workers may
run the thread: a sweep first takes a Redis lock (redis-py's ``Lock``: SET NX PX with a token,
released by a compare-and-delete script), so one sweep runs at a time across the whole
installation; the lock expires by itself if its holder dies.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from celery import bootsteps
from redis.exceptions import LockError

from worker.broker import redis_client
from worker.jobs import JobRecord, JobState
from worker.process import AFTER_POOL
from worker.settings import WorkerSettings
from worker.storage import JOB_ID, Storage, open_storage
from worker.store import JobStore
from worker.usage import ByteKind, Ledger

log = logging.getLogger(__name__)

REASON_RETENTION = "retention"
REASON_DELETED = "deleted"
BATCH = 200
FINISHED_STATES = (JobState.succeeded, JobState.failed, JobState.cancelled)


def remove_uploads(store: JobStore, storage: Storage, job_id: str) -> None:
    """Remove a job's uploads and give their bytes back to its owner's usage (when a job
    ends, whatever the outcome)."""
    storage.remove_uploads(job_id)
    Ledger(store).release(job_id, ByteKind.uploads)


def remove_job_files(store: JobStore, storage: Storage, job_id: str) -> None:
    """Remove everything a job stored and give the bytes back (safe to repeat)."""
    storage.remove_artifacts(job_id)
    storage.remove_uploads(job_id)
    storage.discard_scratch(job_id)
    ledger = Ledger(store)
    ledger.release(job_id, ByteKind.uploads)
    ledger.release(job_id, ByteKind.artifacts)
    store.r.zrem(store.finished_key, job_id)


def expire_job(store: JobStore, storage: Storage, job_id: str, reason: str) -> JobRecord | None:
    """Mark a finished job expired and remove its files; an unfinished job is returned
    unchanged (nothing removed). Returns the job afterwards (None if it does not exist)."""
    record = store.mark_expired(job_id, reason)
    if record is None or record.expired_at is None:
        return record
    remove_job_files(store, storage, job_id)
    return record


def retention_for(settings: WorkerSettings, state: JobState) -> int:
    """Seconds a job finished in ``state`` keeps its files (0: for ever)."""
    specific = {
        JobState.succeeded: settings.retention_succeeded_s,
        JobState.failed: settings.retention_failed_s,
        JobState.cancelled: settings.retention_cancelled_s,
    }.get(state)
    return settings.retention_s if specific is None else specific


@dataclass(frozen=True)
class SweepResult:
    expired: int
    examined: int
    seconds: float


class Cleaner:
    """One retention sweep at a time across every worker (a Redis lock)."""

    def __init__(self, settings: WorkerSettings, store: JobStore, storage: Storage) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.retentions = {s: retention_for(settings, s) for s in FINISHED_STATES}

    def _lock_timeout(self) -> float:
        return max(60.0, 2 * self.settings.cleaner_interval_s)

    def run_once(self, now: float | None = None) -> SweepResult | None:
        """Expire every finished job past its state's retention; None when another sweep
        holds the lock (or nothing ever expires)."""
        positive = [r for r in self.retentions.values() if r > 0]
        if not positive:
            return None
        lock = self.store.r.lock(
            f"{self.store.prefix}lock:retention", timeout=self._lock_timeout(), blocking=False
        )
        if not lock.acquire():
            return None
        started = time.perf_counter()
        expired = examined = 0
        try:
            now = time.time() if now is None else now
            cutoff = now - min(positive)
            offset = 0
            while True:
                batch = self.store.r.zrangebyscore(
                    self.store.finished_key, "-inf", cutoff, offset, BATCH, withscores=True
                )
                if not batch:
                    break
                kept = 0
                for job_id, finished_at in batch:
                    examined += 1
                    if self._due(job_id, finished_at, now):
                        expire_job(self.store, self.storage, job_id, REASON_RETENTION)
                        expired += 1
                    else:
                        kept += 1
                # Expired jobs left the list; skip past the ones kept (a longer retention).
                offset += kept
                lock.extend(self._lock_timeout(), replace_ttl=True)
        finally:
            try:
                lock.release()
            except LockError:  # it expired meanwhile; another sweep may have started
                log.warning("the retention lock expired during a sweep")
        return SweepResult(expired, examined, time.perf_counter() - started)

    def sweep_local_scratch(self) -> int:
        """Remove this machine's scratch folders of finished jobs; returns how many.

        A job's scratch is removed when it ends, but a worker that died leaves its folder,
        and with S3 storage the job may end on another machine. Scratch is local, so every
        worker sweeps its own (no lock), whatever the retention settings say.
        """
        removed = 0
        if not self.storage.scratch_dir.is_dir():
            return 0
        for folder in self.storage.scratch_dir.iterdir():
            record = self.store.get(folder.name) if JOB_ID.match(folder.name) else None
            if record is not None and record.state.terminal:
                self.storage.discard_scratch(folder.name)
                removed += 1
        return removed

    def _due(self, job_id: str, finished_at: float, now: float) -> bool:
        record = self.store.get(job_id)
        if record is None:
            self.store.r.zrem(self.store.finished_key, job_id)
            return False
        if record.expired_at is not None:
            return True  # marked, files not all removed: finish the removal
        keep = self.retentions.get(record.state, 0)
        return keep > 0 and finished_at + keep <= now


class RetentionStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: a daemon thread that sweeps every ``cleaner_interval_s`` (this
    machine's leftover scratch always; expired jobs when a retention is set)."""

    requires = AFTER_POOL  # worker.process: no thread may be mid-import at a fork

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        settings: WorkerSettings = parent.app.settings
        if settings.cleaner_interval_s <= 0:
            return
        assert settings.redis_url
        # Built here, on the main thread (worker.process: AFTER_POOL); one request loads what
        # the storage client imports lazily on its first call.
        storage = open_storage(settings)
        try:
            storage.check()
        except Exception as exc:
            log.warning("storage not reachable at start-up (%s); retention will retry", exc)
        cleaner = Cleaner(
            settings, JobStore(redis_client(settings.redis_url), settings.key_prefix), storage
        )
        self._thread = threading.Thread(
            target=self._loop, args=(cleaner,), name="flow-compress-retention", daemon=True
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self, cleaner: Cleaner) -> None:
        while not self._stop.wait(cleaner.settings.cleaner_interval_s):
            try:
                cleaner.sweep_local_scratch()
                result = cleaner.run_once()
                if result is not None and result.expired:
                    log.info("retention: %d jobs expired in %.2f s", result.expired, result.seconds)
            except Exception:
                # Redis or the store away: the next sweep tries again; the worker keeps going.
                log.warning("retention sweep failed", exc_info=True)
        cleaner.store.r.close()


__all__ = [
    "REASON_DELETED",
    "REASON_RETENTION",
    "Cleaner",
    "RetentionStep",
    "SweepResult",
    "expire_job",
    "remove_job_files",
    "remove_uploads",
    "retention_for",
]
