"""The compression task: thin Celery glue around ``run_job``, a plain function.

``run_job`` owns one delivery of one job: it asks the store whether to run (a redelivered
finished job is a no-op), runs the library in a scratch folder with progress and cancel
hooks, publishes the artifacts atomically and records the outcome. Every outcome leaves the
job in a terminal state, except a transient failure that will be retried.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from celery import Task, shared_task

from flow_compress.arch.catalogue import WeightCaches
from flow_compress.config import CompressionConfig
from flow_compress.errors import CancelledError
from flow_compress.schema import CompressionReport, ProgressEvent
from worker.broker import redis_client
from worker.celery_app import TASK_NAME, FlowCelery
from worker.errors import TRANSIENT_ERRORS, classify
from worker.events import capture_job_logs
from worker.jobs import JobError, JobPayload, JobRecord, JobState
from worker.recovery import note_cut_off
from worker.redact import public_message
from worker.retention import remove_uploads
from worker.storage import ArtifactCorruptError, Storage, open_storage
from worker.store import JobStore, StartOutcome
from worker.telemetry import StageClock, record_stage
from worker.usage import ByteKind, Ledger

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


def _library_compress(
    caches: WeightCaches | None = None, latency_cache: Path | None = None
) -> CompressFn:
    # Imported here, in the pool child that runs the job: importing torch (and possibly
    # initialising CUDA) in the worker's main process would be inherited by every fork.
    from flow_compress.pipeline import compress

    return functools.partial(compress, caches=caches, latency_cache=latency_cache)


def summarise(report: CompressionReport) -> dict[str, float | bool]:
    """Headline numbers and verdicts stored on the job record (the full report stays on
    disk)."""
    out: dict[str, float | bool] = {
        "base_top1": report.base.top1,
        "top1": report.pruned.top1,
        "top1_drop": report.top1_drop,
        "base_macs": float(report.base.macs),
        "macs": float(report.pruned.macs),
        "macs_ratio": report.macs_ratio,
        "params_ratio": report.params_ratio,
    }
    if report.target_met is not None:
        out["target_met"] = report.target_met
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
        remove_uploads(store, storage, job_id)
        return JobState.cancelled if outcome is StartOutcome.cancelled else JobState.failed

    if storage.read_manifest(job_id) is not None:
        # Published by an earlier delivery that died before recording success: finish it.
        _succeed(store, storage, job_id, parse_report(storage.read_artifact(job_id, "report.json")))
        return JobState.succeeded

    log.info("job %s: running (attempt %d)", job_id, record.attempts if record else 0)
    store.progress(job_id, stage=None, step=0, total_steps=0, percent=0.0, macs=None, top1=None)
    out_dir = storage.fresh_scratch(job_id)
    stages = StageClock(lambda stage, s: record_stage(store.r, store.prefix, stage, s))

    def on_progress(event: ProgressEvent) -> None:
        stages.event(event.stage)
        # One line per step in the job's log (GET /v1/jobs/{id}/logs), besides the record.
        log.info(
            "%s %d/%d (%.1f %%)%s",
            event.stage,
            event.step,
            event.total_steps,
            event.percent,
            f": {event.message}" if event.message else "",
        )
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
        # A remote store's inputs are downloaded into scratch/<id>/inputs first.
        local = storage.stage_inputs(payload)
        run(
            local.library_config(),
            weights=Path(local.weights) if local.weights else None,
            out_dir=out_dir,
            progress=on_progress,
            should_cancel=should_cancel,
            # Inside scratch/<id>: kept across redeliveries and retries (a resumed job does not
            # redo its accepted steps), removed with the scratch folder when the job ends.
            checkpoint_dir=storage.checkpoint(job_id),
        )
        report = client_report(out_dir, payload)
        storage.publish(job_id)
    except CancelledError:
        storage.discard_scratch(job_id)
        store.finish(job_id, JobState.cancelled, message="cancelled while running")
        remove_uploads(store, storage, job_id)
        return JobState.cancelled
    except Exception as exc:
        failure = classify(exc)
        # The operator's log keeps the full message; the job (what clients see) a version
        # without server paths (worker.redact).
        shown = public_message(failure.code, failure.message, payload, storage)
        if failure.transient and can_retry:
            storage.discard_output(job_id)  # the checkpoint stays for the retry to resume
            log.warning("job %s: transient failure, will retry: %s", job_id, failure.message)
            store.requeue(job_id, f"retrying after: {shown}")
            raise TransientFailure(failure.message) from exc
        storage.discard_scratch(job_id)
        log.info("job %s failed: [%s] %s", job_id, failure.code, failure.message)
        store.finish(job_id, JobState.failed, error=JobError(code=failure.code, message=shown))
        remove_uploads(store, storage, job_id)
        return JobState.failed
    stages.finish()
    _succeed(store, storage, job_id, report)
    return JobState.succeeded


def read_report(folder: Path) -> CompressionReport:
    """The report a job wrote; a missing or malformed one is an ``ArtifactCorruptError``."""
    try:
        raw = (folder / "report.json").read_bytes()
    except OSError as exc:
        raise ArtifactCorruptError(f"report.json is missing or invalid: {exc}") from exc
    return parse_report(raw)


def parse_report(raw: bytes | None) -> CompressionReport:
    """A report's bytes (None: not published) as the model, or ``ArtifactCorruptError``."""
    if raw is None:
        raise ArtifactCorruptError("report.json is missing")
    try:
        return CompressionReport.model_validate_json(raw)
    except ValueError as exc:
        raise ArtifactCorruptError(f"report.json is missing or invalid: {exc}") from exc


def client_report(out_dir: Path, payload: JobPayload) -> CompressionReport:
    """The job's report, made to show the client's own config: the library ran on the
    resolved dataset path (``JobPayload.library_config``), which clients never see, so a
    report naming it is rewritten (report.json, report.md, plots) with the client's
    reference, and the manifest re-written to match."""
    report = read_report(out_dir)
    if report.config == payload.config and report.dataset == payload.config.dataset:
        return report
    from flow_compress.artifacts import read_manifest, write_manifest
    from flow_compress.report import write_report

    report = report.model_copy(update={"config": payload.config, "dataset": payload.config.dataset})
    names = [entry.name for entry in read_manifest(out_dir).files]
    write_report(report, out_dir)
    write_manifest(out_dir, names)
    return report


def _succeed(store: JobStore, storage: Storage, job_id: str, report: CompressionReport) -> None:
    result = summarise(report)
    # Counted once per job, also when a redelivery finishes an earlier delivery's publication.
    Ledger(store).add(job_id, ByteKind.artifacts, storage.artifact_bytes(job_id))
    store.progress(job_id, macs=report.pruned.macs, top1=report.pruned.top1)
    store.finish(job_id, JobState.succeeded, result=result, message="succeeded")
    log.info(
        "job %s succeeded: top-1 %.2f %% (base %.2f %%), %.1f %% of the base MACs",
        job_id,
        report.pruned.top1,
        report.base.top1,
        100 * report.macs_ratio,
    )
    remove_uploads(store, storage, job_id)


class CompressTask(Task):  # type: ignore[misc]
    """Task class: ``on_failure`` also runs in the worker's main process after a hard time
    limit killed the child, which is the only path where ``run_job`` cannot record the end;
    ``on_retry`` runs there when Celery stopped the job because the broker connection was lost.
    """

    app: FlowCelery
    _context: tuple[int, JobStore, Storage] | None = None
    # Main-process decisions: drop a finished job's message, requeue a lost worker's job.
    Request = "worker.request:JobRequest"
    # Transient failures retry through Celery's own exponential backoff with full jitter;
    # the factor, cap and count come from the settings (task_annotations, celery_app).
    autoretry_for = (TransientFailure, *TRANSIENT_ERRORS)
    retry_jitter = True

    def context(self) -> tuple[JobStore, Storage]:
        """This process's store and storage; rebuilt after a fork, because a pool child
        must not share its parent's Redis sockets."""
        pid = os.getpid()
        if self._context is None or self._context[0] != pid:
            settings = self.app.settings
            assert settings.redis_url
            store = JobStore(
                redis_client(settings.redis_url),
                settings.key_prefix,
                events_ttl_s=settings.events_ttl_s,
            )
            self._context = (pid, store, open_storage(settings))
        return self._context[1], self._context[2]

    def job_is_over(self, task_id: str) -> bool:
        """Whether the job needs no run at all: unknown, or finished (a job cancelled while
        queued, a redelivered finished one). Called in the main process."""
        store, _ = self.context()
        record = store.get(task_id)
        return record is None or record.state.terminal

    def worker_lost(self, task_id: str) -> JobRecord | None:
        """The child running ``task_id`` died: requeue the job, or fail it past
        ``max_redeliveries`` (``JobStore.requeue_lost``). Called in the main process."""
        store, storage = self.context()
        record = store.requeue_lost(task_id, max_redeliveries=self.app.settings.max_redeliveries)
        if record is not None and record.state is JobState.failed:
            storage.discard_scratch(task_id)
            remove_uploads(store, storage, task_id)
        return record

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        store, storage = self.context()
        failure = classify(exc)
        shown = public_message(failure.code, failure.message, None, storage)
        if store.finish(task_id, JobState.failed, error=JobError(code=failure.code, message=shown)):
            log.error("job %s failed outside run_job: [%s]", task_id, failure.code)
        storage.discard_scratch(task_id)
        remove_uploads(store, storage, task_id)

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
    """Validate the message and run the job. A transient failure (``TransientFailure``, or
    the store itself unreachable while starting or finishing) propagates, and Celery retries
    it (``autoretry_for``) with its exponential backoff until ``max_retries``."""
    job = JobPayload.model_validate(payload)
    store, storage = self.context()
    can_retry = int(self.request.retries or 0) < self.max_retries
    # This runs in the pool child, one job per process: every record logged meanwhile
    # belongs to this job and goes to its log stream.
    with capture_job_logs(store.r, store.streams, job.job_id):
        state = run_job(
            job,
            store=store,
            storage=storage,
            max_redeliveries=self.app.settings.max_redeliveries,
            can_retry=can_retry,
            # The worker's local weight caches (hf-hub: references, pretrained).
            # ... and its latency cost model's layer tables, kept across jobs.
            compress=_library_compress(
                self.app.settings.weight_caches, self.app.settings.cache_dir / "latency"
            ),
        )
    return state.value if state else None


__all__ = ["CompressFn", "TransientFailure", "compress_job", "run_job", "summarise"]
