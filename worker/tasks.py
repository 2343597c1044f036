"""The compression task: thin Celery glue around ``run_job``, a plain function.

``run_job`` owns one delivery of one job: it asks the store whether to run (a redelivered
finished job is a no-op), runs the library in a scratch folder with progress and cancel
hooks, publishes the artifacts atomically and records the outcome. Every outcome leaves the
job in a terminal state, except a transient failure that will be retried.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from celery import Task, shared_task

from flow_compress.config import CompressionConfig
from flow_compress.errors import CancelledError
from flow_compress.schema import CompressionReport, ProgressEvent
from worker.broker import redis_client
from worker.celery_app import TASK_NAME, FlowCelery
from worker.errors import classify
from worker.jobs import JobError, JobPayload, JobState
from worker.recovery import note_cut_off
from worker.storage import ArtifactCorruptError, Storage
from worker.store import JobStore, StartOutcome

log = logging.getLogger(__name__)


class CompressFn(Protocol):
    """The library's ``flow_compress.pipeline.compress`` signature."""

    def __call__(
        self,
        config: CompressionConfig,
        *,
        weights: Path | None,
        out_dir: Path,
        progress: Callable[[ProgressEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        checkpoint_dir: Path | None = None,
    ) -> CompressionReport: ...


class TransientFailure(Exception):
    """A failure worth retrying; the job was put back to ``queued``."""


def _library_compress() -> CompressFn:
    # Imported here, in the pool child that runs the job: importing torch (and possibly
    # initialising CUDA) in the worker's main process would be inherited by every fork.
    from flow_compress.pipeline import compress

    return compress


def summarise(report: CompressionReport) -> dict[str, float]:
    """Headline numbers stored on the job record (the full report stays on disk)."""
    out = {
        "base_top1": report.base.top1,
        "top1": report.pruned.top1,
        "top1_drop": report.top1_drop,
        "base_macs": float(report.base.macs),
        "macs": float(report.pruned.macs),
        "macs_ratio": report.macs_ratio,
        "params_ratio": report.params_ratio,
    }
    if report.speedup is not None:
        out["speedup"] = report.speedup
    return out


def run_job(
    payload: JobPayload,
    *,
    store: JobStore,
    storage: Storage,
    max_redeliveries: int,
    can_retry: bool,
    compress: CompressFn | None = None,
) -> JobState | None:
    """Run one delivery of a job; return its state afterwards (None: nothing to do).

    Raises ``TransientFailure`` (after requeueing the job) when the failure is transient and
    ``can_retry``; the caller schedules the retry.
    """
    job_id = payload.job_id
    outcome, record = store.start(job_id, max_redeliveries=max_redeliveries)
    if outcome is StartOutcome.skip:
        log.info("job %s: nothing to do (%s)", job_id, record.state.value if record else "unknown")
        return record.state if record else None
    if outcome in (StartOutcome.cancelled, StartOutcome.lost):
        storage.discard_scratch(job_id)
        storage.remove_uploads(job_id)
        return JobState.cancelled if outcome is StartOutcome.cancelled else JobState.failed

    if storage.read_manifest(job_id) is not None:
        # Published by an earlier delivery that died before recording success: finish it.
        _succeed(store, storage, job_id, read_report(storage.artifacts(job_id)))
        return JobState.succeeded

    store.progress(job_id, stage=None, step=0, total_steps=0, percent=0.0, macs=None, top1=None)
    out_dir = storage.fresh_scratch(job_id)

    def on_progress(event: ProgressEvent) -> None:
        store.progress(
            job_id,
            stage=event.stage,
            step=event.step,
            total_steps=event.total_steps,
            percent=round(float(event.percent), 2),
            macs=event.macs,
            top1=event.top1,
            message=event.message,
        )

    def should_cancel() -> bool:
        return store.cancel_requested(job_id)

    try:
        run = compress or _library_compress()
        run(
            payload.config,
            weights=Path(payload.weights) if payload.weights else None,
            out_dir=out_dir,
            progress=on_progress,
            should_cancel=should_cancel,
            # Inside scratch/<id>: kept across redeliveries and retries (a resumed job does not
            # redo its accepted steps), removed with the scratch folder when the job ends.
            checkpoint_dir=storage.checkpoint(job_id),
        )
        report = read_report(out_dir)
        storage.publish(job_id)
    except CancelledError:
        storage.discard_scratch(job_id)
        store.finish(job_id, JobState.cancelled, message="cancelled while running")
        storage.remove_uploads(job_id)
        return JobState.cancelled
    except Exception as exc:
        failure = classify(exc)
        if failure.transient and can_retry:
            storage.discard_output(job_id)  # the checkpoint stays for the retry to resume
            log.warning("job %s: transient failure, will retry: %s", job_id, failure.message)
            store.requeue(job_id, f"retrying after: {failure.message}")
            raise TransientFailure(failure.message) from exc
        storage.discard_scratch(job_id)
        log.info("job %s failed: [%s] %s", job_id, failure.code, failure.message)
        store.finish(
            job_id, JobState.failed, error=JobError(code=failure.code, message=failure.message)
        )
        storage.remove_uploads(job_id)
        return JobState.failed
    _succeed(store, storage, job_id, report)
    return JobState.succeeded


def read_report(folder: Path) -> CompressionReport:
    """The report a job wrote; a missing or malformed one is an ``ArtifactCorruptError``."""
    path = folder / "report.json"
    try:
        return CompressionReport.model_validate_json(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactCorruptError(f"report.json is missing or invalid: {exc}") from exc


def _succeed(store: JobStore, storage: Storage, job_id: str, report: CompressionReport) -> None:
    result = summarise(report)
    store.progress(job_id, macs=report.pruned.macs, top1=report.pruned.top1)
    store.finish(job_id, JobState.succeeded, result=result, message="succeeded")
    storage.remove_uploads(job_id)


class CompressTask(Task):  # type: ignore[misc]
    """Task class: ``on_failure`` also runs in the worker's main process after a hard time
    limit killed the child, which is the only path where ``run_job`` cannot record the end;
    ``on_retry`` runs there when Celery stopped the job because the broker connection was lost.
    """

    app: FlowCelery
    _context: tuple[int, JobStore, Storage] | None = None

    def context(self) -> tuple[JobStore, Storage]:
        """This process's store and storage; rebuilt after a fork, because a pool child
        must not share its parent's Redis sockets."""
        pid = os.getpid()
        if self._context is None or self._context[0] != pid:
            settings = self.app.settings
            assert settings.redis_url
            store = JobStore(redis_client(settings.redis_url), settings.key_prefix)
            self._context = (pid, store, Storage(settings.storage_dir))
        return self._context[1], self._context[2]

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        store, storage = self.context()
        failure = classify(exc)
        if store.finish(
            task_id, JobState.failed, error=JobError(code=failure.code, message=failure.message)
        ):
            log.error("job %s failed outside run_job: [%s]", task_id, failure.code)
        storage.discard_scratch(task_id)
        storage.remove_uploads(task_id)

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        # A retry raised by the task itself comes with its traceback (``einfo``), in the pool
        # child, after run_job requeued the job. Without one, this is Celery's main process
        # announcing that it terminated the running job because the broker connection was
        # lost (``Request.cancel``): Redis may be down, so nothing can be written now; the
        # job is put back on the queue once the consumer has reconnected (worker.recovery).
        if einfo is None:
            log.warning("job %s: stopped because the broker connection was lost", task_id)
            note_cut_off(task_id)


@shared_task(bind=True, base=CompressTask, name=TASK_NAME)
def compress_job(self: CompressTask, payload: dict[str, Any]) -> str | None:
    """Validate the message and run the job; transient failures retry with backoff."""
    job = JobPayload.model_validate(payload)
    settings = self.app.settings
    store, storage = self.context()
    retries = int(self.request.retries or 0)
    can_retry = retries < settings.max_retries
    try:
        state = run_job(
            job,
            store=store,
            storage=storage,
            max_redeliveries=settings.max_redeliveries,
            can_retry=can_retry,
        )
    except Exception as exc:
        # TransientFailure, or the store itself unreachable while starting or finishing.
        if can_retry and (isinstance(exc, TransientFailure) or classify(exc).transient):
            countdown = settings.retry_backoff_s * (2**retries)
            raise self.retry(
                exc=exc, countdown=countdown, max_retries=settings.max_retries
            ) from exc
        raise
    return state.value if state else None


__all__ = ["CompressFn", "TransientFailure", "compress_job", "run_job", "summarise"]
