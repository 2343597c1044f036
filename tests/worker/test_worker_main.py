"""What the worker's main process decides (``worker.request``), with a real Celery worker:
messages of jobs cancelled while queued are dropped without starting a process; transient
failures retry through Celery's own backoff settings. (A killed pool child's job going back
to the head of the queue at once is checked in test_resilience.py, on its kill test.)
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.worker.support import service_env, settings_env, start_worker, stop
from tests.worker.test_resilience import api, finished, submit
from worker.jobs import JobState
from worker.settings import WorkerSettings
from worker.store import JobStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


CANCELLED = 30


def test_cancelled_jobs_are_dropped_without_starting_a_process(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """30 jobs cancelled while queued, then one more: the worker drops the 30 messages in
    its main process, and the last job runs in the pool's first child (before the change,
    each cancelled job cost a fresh child: the last one ran in ForkPoolWorker-31)."""
    storage, log = tmp_path / "storage", tmp_path / "worker.log"
    client = api(redis_url, storage, key_prefix)
    try:
        store: JobStore = client.app.state.store  # type: ignore[attr-defined]
        for _ in range(CANCELLED):
            job = submit(client, b"not weights")
            assert client.delete(f"/v1/jobs/{job}").json()["state"] == "cancelled"
        last = submit(client, b"not weights")  # runs, and fails with bad_checkpoint
        t0 = time.monotonic()
        worker = start_worker(service_env(**settings_env(redis_url, key_prefix, storage)), log)
        try:
            rec = finished(store, last, log)
            elapsed = time.monotonic() - t0
            assert rec.state is JobState.failed and rec.error is not None
            assert rec.error.code == "bad_checkpoint"
            text = log.read_text()
            print(f"{CANCELLED} cancelled jobs, then one: {elapsed:.1f} s from worker start")
            assert len(re.findall(r"is over \(cancelled or finished\): message dropped", text)) == (
                CANCELLED
            ), text[-3000:]
            assert re.search(rf"ForkPoolWorker-1\].*{last}", text), text[-3000:]
            assert "ForkPoolWorker-2]" not in text
        finally:
            stop(worker)
        assert store.r.llen(f"{key_prefix}celery:gpu") == 0
    finally:
        client.__exit__(None, None, None)


def test_transient_failures_retry_with_celerys_backoff_from_the_settings(
    redis_url: str, key_prefix: str
) -> None:
    from worker.celery_app import TASK_NAME, create_celery
    from worker.tasks import TransientFailure

    settings = WorkerSettings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        max_retries=5,
        retry_backoff_s=7,
        retry_backoff_max_s=90,
    )
    app = create_celery(settings)
    app.loader.import_default_modules()
    task = app.tasks[TASK_NAME]
    import redis

    assert {TransientFailure, redis.ConnectionError} <= set(task.autoretry_for)
    assert (task.max_retries, task.retry_backoff, task.retry_backoff_max) == (5, 7, 90)
    assert task.retry_jitter is True
    # The countdown Celery's autoretry computes from these: up to factor * 2^n, capped.
    from celery.utils.time import get_exponential_backoff_interval

    waits = [get_exponential_backoff_interval(7, n, 90, full_jitter=False) for n in range(5)]
    assert waits == [7, 14, 28, 56, 90]
    assert json.dumps(app.conf.task_annotations[TASK_NAME], sort_keys=True)
