"""The event and log streams of a job, on a real Redis: every committed change is one event,
in order, none for a change that did not happen; the log handler keeps what the loggers let
through, cuts long lines, and never lets an unreachable Redis fail the job."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator

import pytest

from worker.broker import redis_client
from worker.events import MAX_LOG_CHARS, JobStreams, capture_job_logs
from worker.jobs import JobRecord, JobState
from worker.store import JobStore


@pytest.fixture
def store(redis_url: str, key_prefix: str) -> Iterator[JobStore]:
    client = redis_client(redis_url)
    yield JobStore(client, key_prefix, events_ttl_s=120)
    client.close()


def _job(store: JobStore) -> str:
    now = time.time()
    job_id = uuid.uuid4().hex
    config = {"model": "resnet18", "dataset": "digits"}
    store.create(
        JobRecord(
            id=job_id, owner="o", state=JobState.queued, config=config,  # type: ignore[arg-type]
            created_at=now, updated_at=now,
        )
    )  # fmt: skip
    return job_id


def _events(store: JobStore, job_id: str) -> list[dict[str, object]]:
    entries = store.r.xrange(store.streams.events_key(job_id))
    return [json.loads(JobStreams.decode_event(fields)) for _, fields in entries]  # type: ignore[union-attr]


def test_each_committed_change_is_one_event_with_the_records_values(store: JobStore) -> None:
    job_id = _job(store)
    store.start(job_id, max_redeliveries=2)
    store.progress(job_id, stage="Filter Prune", step=1, total_steps=2, percent=32.5, macs=7)
    store.finish(job_id, JobState.succeeded, result={"top1": 1.0})
    # Changes refused by the compare-and-set write no event.
    assert not store.progress(job_id, percent=50.0)
    assert not store.finish(job_id, JobState.failed)
    events = _events(store, job_id)
    assert [e["state"] for e in events] == ["queued", "running", "running", "succeeded"]
    assert events[2]["macs"] == 7 and events[2]["stage"] == "Filter Prune"
    assert events[3]["percent"] == 100.0 and events[3]["result"] == {"top1": 1.0}
    record = store.get(job_id)
    assert record is not None and events[-1]["message"] == record.message
    ttl = store.r.ttl(store.streams.events_key(job_id))
    assert 0 < ttl <= 120  # type: ignore[operator]


def test_the_log_handler_keeps_the_jobs_records_and_survives_a_dead_redis(
    store: JobStore,
) -> None:
    job_id = _job(store)
    log = logging.getLogger("flow_compress.test")
    log.setLevel(logging.DEBUG)
    with capture_job_logs(store.r, store.streams, job_id):
        log.debug("not kept: below INFO")
        log.info("step %d of %d", 1, 2)
        log.warning("x" * (MAX_LOG_CHARS + 100))
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    log.info("after the job: not kept")
    lines = store.streams.read_logs(store.r, job_id, after=None, limit=100)
    assert [(line.level, line.logger) for line in lines] == [
        ("INFO", "flow_compress.test"),
        ("WARNING", "flow_compress.test"),
        ("ERROR", "flow_compress.test"),
    ]
    assert lines[0].message == "step 1 of 2"
    assert len(lines[1].message) == MAX_LOG_CHARS and lines[1].message.endswith("…")
    assert "ValueError: boom" in lines[2].message  # the traceback is part of the line
    assert store.streams.read_logs(store.r, job_id, after=lines[0].id, limit=1) == [lines[1]]

    dead = redis_client("redis://127.0.0.1:1/0")  # nothing listens on port 1
    with capture_job_logs(dead, store.streams, job_id):
        log.info("lost, silently")
    assert len(store.streams.read_logs(store.r, job_id, after=None, limit=100)) == 3
    assert not any(type(h).__name__ == "JobLogHandler" for h in logging.getLogger().handlers)
