"""``run_job``'s orchestration against a real Redis, with the library replaced by a small
function honouring ``compress``'s contract (writes artifacts and a manifest, reports
progress, checks the cancel flag, raises typed errors). The real library runs in
tests/api/test_service_e2e.py."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from flow_compress.config import CompressionConfig
from flow_compress.errors import BadCheckpointError, CancelledError
from flow_compress.schema import CompressionReport, ModelMetrics, ProgressEvent, StepRecord
from worker.broker import redis_client
from worker.celery_app import TASK_NAME, create_celery
from worker.jobs import JobPayload, JobRecord, JobState
from worker.settings import WorkerSettings
from worker.storage import Storage
from worker.store import JobStore
from worker.tasks import TransientFailure, run_job

CONFIG = CompressionConfig(model="resnet18", dataset="digits", target_macs=0.5)


def make_report() -> CompressionReport:
    base = ModelMetrics(top1=95.0, top5=99.0, macs=1_000_000, params=10_000)
    pruned = ModelMetrics(top1=94.0, top5=99.0, macs=400_000, params=4_000)
    return CompressionReport(
        model="resnet18",
        dataset="digits",
        config=CONFIG,
        base=base,
        pruned=pruned,
        macs_ratio=0.4,
        params_ratio=0.4,
        top1_drop=1.0,
        steps=[StepRecord(step=0, stage="Baseline", macs=1, params=1, top1=95.0, top5=99.0)],
    )


def write_outputs(out_dir: Path, extra: dict[str, bytes] | None = None) -> None:
    out_dir.mkdir(parents=True)
    files = {"report.json": make_report().model_dump_json().encode(), "model.onnx": b"onnx"}
    files |= extra or {}
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    manifest = {
        "files": [
            {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for n, d in files.items()
        ]
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest))


class FakeLibrary:
    """Follows compress()'s contract; ``fail`` raises after the first step."""

    def __init__(self, fail: BaseException | None = None, steps: int = 3) -> None:
        self.fail = fail
        self.steps = steps
        self.calls = 0
        self.cancel_checks: list[bool] = []
        self.checkpoint_dirs: list[Path | None] = []

    def __call__(
        self,
        config: CompressionConfig,
        *,
        weights: Path | None,
        out_dir: Path,
        progress: Callable[[ProgressEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        checkpoint_dir: Path | None = None,
    ) -> CompressionReport:
        self.calls += 1
        self.checkpoint_dirs.append(checkpoint_dir)
        assert config == CONFIG and weights is not None and weights.is_file()
        for step in range(1, self.steps + 1):
            if should_cancel is not None:
                self.cancel_checks.append(should_cancel())
                if self.cancel_checks[-1]:
                    raise CancelledError("cancelled between steps")
            if progress is not None:
                progress(ProgressEvent("Filter Prune", step, self.steps, 100.0 * step / self.steps))
            if self.fail is not None:
                raise self.fail
        write_outputs(out_dir)
        return make_report()


@pytest.fixture
def env(redis_url: str, key_prefix: str, tmp_path: Path) -> Iterator[tuple[JobStore, Storage]]:
    client = redis_client(redis_url)
    storage = Storage(tmp_path / "storage")
    storage.ensure()
    yield JobStore(client, key_prefix), storage
    client.close()


def submit(store: JobStore, storage: Storage) -> JobPayload:
    job_id = uuid.uuid4().hex
    uploads = storage.uploads(job_id)
    uploads.mkdir(parents=True)
    (uploads / "weights.bin").write_bytes(b"weights")
    now = time.time()
    store.create(
        JobRecord(
            id=job_id,
            owner="public",
            state=JobState.queued,
            config=CONFIG,
            weights=str(uploads / "weights.bin"),
            created_at=now,
            updated_at=now,
        )
    )
    return JobPayload(job_id=job_id, config=CONFIG, weights=str(uploads / "weights.bin"))


def run(store: JobStore, storage: Storage, payload: JobPayload, lib: FakeLibrary, **kw: bool):  # type: ignore[no-untyped-def]
    return run_job(
        payload,
        store=store,
        storage=storage,
        max_redeliveries=2,
        can_retry=kw.get("can_retry", True),
        compress=lib,
    )


def test_success_publishes_atomically_and_records_the_result(
    env: tuple[JobStore, Storage],
) -> None:
    store, storage = env
    payload = submit(store, storage)
    seen: list[float] = []
    lib = FakeLibrary()
    original = store.progress

    def spy(job_id: str, **fields: object) -> bool:
        if fields.get("stage"):  # a library progress event
            seen.append(float(fields["percent"]))  # type: ignore[arg-type]
            # While the job runs, nothing is published yet.
            assert not storage.artifacts(job_id).exists()
        return original(job_id, **fields)

    store.progress = spy  # type: ignore[method-assign]
    assert run(store, storage, payload, lib) is JobState.succeeded
    rec = store.get(payload.job_id)
    assert rec is not None and rec.state is JobState.succeeded and rec.percent == 100.0
    assert rec.result is not None and rec.result["top1_drop"] == 1.0
    assert rec.top1 == 94.0 and rec.macs == 400_000
    assert len(seen) == 3 and seen == sorted(seen) and seen[-1] == 100.0
    manifest = storage.read_manifest(payload.job_id)
    assert manifest is not None
    assert {f.name for f in manifest.files} == {"report.json", "model.onnx"}
    assert not storage.scratch(payload.job_id).exists()
    assert not storage.uploads(payload.job_id).exists()


def test_redelivered_finished_job_is_a_noop(env: tuple[JobStore, Storage]) -> None:
    store, storage = env
    payload = submit(store, storage)
    run(store, storage, payload, FakeLibrary())
    before = store.get(payload.job_id)
    again = FakeLibrary()
    assert run(store, storage, payload, again) is JobState.succeeded
    assert again.calls == 0
    assert store.get(payload.job_id) == before


def test_published_but_unrecorded_job_is_finished_without_rerunning(
    env: tuple[JobStore, Storage],
) -> None:
    """A worker that died between the rename and the store update: the redelivery records
    success from the published artifacts instead of compressing again."""
    store, storage = env
    payload = submit(store, storage)
    store.start(payload.job_id, max_redeliveries=2)
    write_outputs(storage.fresh_scratch(payload.job_id))
    storage.publish(payload.job_id)
    lib = FakeLibrary()
    assert run(store, storage, payload, lib) is JobState.succeeded
    assert lib.calls == 0
    assert store.get(payload.job_id).result["macs_ratio"] == 0.4  # type: ignore[index,union-attr]


def test_cancel_flag_stops_a_running_job_and_cleans_up(env: tuple[JobStore, Storage]) -> None:
    store, storage = env
    payload = submit(store, storage)
    lib = FakeLibrary(steps=4)
    original = store.progress

    def cancel_after_first_step(job_id: str, **fields: object) -> bool:
        changed = original(job_id, **fields)
        if fields.get("step") == 1:
            store.request_cancel(job_id)
        return changed

    store.progress = cancel_after_first_step  # type: ignore[method-assign]
    assert run(store, storage, payload, lib) is JobState.cancelled
    assert lib.cancel_checks == [False, True]
    rec = store.get(payload.job_id)
    assert rec is not None and rec.state is JobState.cancelled and rec.step == 1
    assert not storage.artifacts(payload.job_id).exists()
    assert not storage.scratch(payload.job_id).exists()
    assert not storage.uploads(payload.job_id).exists()


def test_user_error_fails_at_once_with_its_code(env: tuple[JobStore, Storage]) -> None:
    store, storage = env
    payload = submit(store, storage)
    lib = FakeLibrary(fail=BadCheckpointError("weights do not fit"))
    assert run(store, storage, payload, lib, can_retry=True) is JobState.failed
    rec = store.get(payload.job_id)
    assert rec is not None and rec.error is not None
    assert (rec.error.code, rec.error.message) == ("bad_checkpoint", "weights do not fit")
    assert lib.calls == 1 and not storage.scratch(payload.job_id).exists()


def test_transient_error_requeues_for_retry_until_retries_run_out(
    env: tuple[JobStore, Storage],
) -> None:
    store, storage = env
    payload = submit(store, storage)
    lib = FakeLibrary(fail=redis.ConnectionError("connection reset"))
    with pytest.raises(TransientFailure):
        run(store, storage, payload, lib, can_retry=True)
    rec = store.get(payload.job_id)
    assert rec is not None and rec.state is JobState.queued
    assert storage.uploads(payload.job_id).exists()  # kept for the retry
    assert run(store, storage, payload, lib, can_retry=False) is JobState.failed
    rec = store.get(payload.job_id)
    assert rec is not None and rec.error is not None
    assert rec.error.code == "service_unavailable" and rec.attempts == 2


def test_output_that_contradicts_its_manifest_is_not_published(
    env: tuple[JobStore, Storage],
) -> None:
    store, storage = env
    payload = submit(store, storage)

    class Tampering(FakeLibrary):
        def __call__(self, config, *, weights, out_dir, progress=None, should_cancel=None, **kw):  # type: ignore[no-untyped-def]
            report = super().__call__(config, weights=weights, out_dir=out_dir, progress=progress)
            (out_dir / "model.onnx").write_bytes(b"tampered")
            return report

    assert run(store, storage, payload, Tampering()) is JobState.failed
    rec = store.get(payload.job_id)
    assert rec is not None and rec.error is not None and rec.error.code == "artifact_corrupt"
    assert not storage.artifacts(payload.job_id).exists()


def test_soft_time_limit_fails_the_job_with_its_code(env: tuple[JobStore, Storage]) -> None:
    store, storage = env
    payload = submit(store, storage)
    assert run(store, storage, payload, FakeLibrary(fail=SoftTimeLimitExceeded())) is (
        JobState.failed
    )
    rec = store.get(payload.job_id)
    assert rec is not None and rec.error is not None
    assert rec.error.code == "timeout"


def test_hard_time_limit_is_recorded_by_the_task_in_the_main_process(
    env: tuple[JobStore, Storage], redis_url: str, key_prefix: str
) -> None:
    """After a hard time limit Celery kills the child and calls ``on_failure`` in the
    worker's main process: the job must end ``failed`` there, its files removed."""
    store, storage = env
    payload = submit(store, storage)
    store.start(payload.job_id, max_redeliveries=2)
    (storage.fresh_scratch(payload.job_id).parent / "partial.bin").write_bytes(b"x")
    settings = WorkerSettings(redis_url=redis_url, key_prefix=key_prefix, storage_dir=storage.root)
    task = create_celery(settings).tasks[TASK_NAME]
    task.on_failure(TimeLimitExceeded(60), payload.job_id, (), {}, None)
    rec = store.get(payload.job_id)
    assert rec is not None and rec.state is JobState.failed
    assert rec.error is not None and rec.error.code == "timeout"
    assert not storage.scratch(payload.job_id).exists()
    assert not storage.uploads(payload.job_id).exists()


class CheckpointingLibrary(FakeLibrary):
    """Writes a checkpoint file like the library does, then fails (if told to)."""

    def __call__(  # type: ignore[no-untyped-def]
        self, config, *, weights, out_dir, progress=None, should_cancel=None, checkpoint_dir=None
    ):
        assert checkpoint_dir is not None
        self.checkpoint_dirs.append(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (checkpoint_dir / "state.json").write_text(f"attempt {len(self.checkpoint_dirs)}")
        (out_dir.parent / "partial.bin").write_bytes(b"partial output")
        fail, self.fail = self.fail, None  # fail the first call only
        if fail is not None:
            raise fail
        write_outputs(out_dir)
        return make_report()


def test_the_checkpoint_survives_retries_and_redeliveries_and_goes_when_the_job_ends(
    env: tuple[JobStore, Storage],
) -> None:
    store, storage = env
    payload = submit(store, storage)
    lib = CheckpointingLibrary(fail=redis.ConnectionError("connection reset"))
    with pytest.raises(TransientFailure):
        run(store, storage, payload, lib, can_retry=True)
    ckpt = storage.checkpoint(payload.job_id)
    assert (ckpt / "state.json").read_text() == "attempt 1"
    assert not (storage.scratch(payload.job_id) / "partial.bin").exists()

    # A redelivery (the worker died) keeps the checkpoint and drops the partial output.
    (storage.scratch(payload.job_id) / "partial.bin").write_bytes(b"left by a dead worker")
    storage.fresh_scratch(payload.job_id)
    assert (ckpt / "state.json").exists()
    assert not (storage.scratch(payload.job_id) / "partial.bin").exists()

    assert run(store, storage, payload, lib) is JobState.succeeded
    assert lib.checkpoint_dirs == [ckpt, ckpt]
    assert not storage.scratch(payload.job_id).exists()  # checkpoint removed after publication


@pytest.mark.parametrize(
    "fail", [BadCheckpointError("bad"), SoftTimeLimitExceeded(), CancelledError("stop")]
)
def test_a_failed_timed_out_or_cancelled_job_leaves_no_scratch_or_checkpoint(
    env: tuple[JobStore, Storage], fail: BaseException
) -> None:
    store, storage = env
    payload = submit(store, storage)
    state = run(store, storage, payload, CheckpointingLibrary(fail=fail))
    rec = store.get(payload.job_id)
    assert rec is not None and rec.state is state
    if isinstance(fail, SoftTimeLimitExceeded):
        assert rec.error is not None and rec.error.code == "timeout"
    assert not storage.scratch(payload.job_id).exists()
    assert not storage.uploads(payload.job_id).exists()
    assert not storage.artifacts(payload.job_id).exists()
