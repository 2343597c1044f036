"""The job store against a real Redis: transitions are compare-and-set, indexes stay true."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from flow_compress.config import CompressionConfig
from worker.broker import redis_client
from worker.jobs import JobError, JobRecord, JobState
from worker.store import JobStore, StartOutcome
from worker.usage import Idempotency, Ledger, Refused, Replayed

CONFIG = CompressionConfig(model="resnet18", dataset="digits")


@pytest.fixture
def store(redis_url: str, key_prefix: str) -> Iterator[JobStore]:
    client = redis_client(redis_url)
    yield JobStore(client, key_prefix)
    client.close()


def new_job(store: JobStore, owner: str = "public", created: float | None = None) -> JobRecord:
    now = created or time.time()
    record = JobRecord(
        id=uuid.uuid4().hex,
        owner=owner,
        state=JobState.queued,
        config=CONFIG,
        created_at=now,
        updated_at=now,
    )
    store.create(record)
    return record


def state_index_members(store: JobStore, owner: str) -> dict[str, set[str]]:
    return {
        s.value: set(store.r.zrange(f"{store.prefix}jobs:{owner}:{s.value}", 0, -1))
        for s in JobState
    }


def test_record_round_trips(store: JobStore) -> None:
    rec = new_job(store)
    got = store.get(rec.id)
    assert got == rec
    assert store.get(uuid.uuid4().hex) is None
    with pytest.raises(ValueError, match="already exists"):
        store.create(rec)


def test_list_pages_filters_and_separates_owners(store: JobStore) -> None:
    ids = [new_job(store, "alice", created=1000.0 + i).id for i in range(5)]
    new_job(store, "bob")
    page, total = store.list("alice", offset=1, limit=2)
    assert total == 5
    assert [r.id for r in page] == [ids[3], ids[2]]  # newest first
    store.request_cancel(ids[0])
    cancelled, n = store.list("alice", state=JobState.cancelled)
    assert n == 1 and [r.id for r in cancelled] == [ids[0]]
    assert store.list("alice", state=JobState.queued)[1] == 4
    assert store.list("bob")[1] == 1


def test_start_runs_a_queued_job_once_and_redelivery_of_finished_is_a_noop(
    store: JobStore,
) -> None:
    rec = new_job(store)
    outcome, running = store.start(rec.id, max_redeliveries=2)
    assert outcome is StartOutcome.run
    assert running is not None and running.state is JobState.running and running.attempts == 1
    assert store.finish(rec.id, JobState.succeeded, result={"top1": 90.0})
    outcome, after = store.start(rec.id, max_redeliveries=2)
    assert outcome is StartOutcome.skip
    assert after is not None and after.state is JobState.succeeded and after.attempts == 1
    assert not store.finish(rec.id, JobState.failed, error=JobError(code="x", message="y"))
    assert store.get(rec.id).state is JobState.succeeded  # type: ignore[union-attr]
    assert store.start(uuid.uuid4().hex, max_redeliveries=2) == (StartOutcome.skip, None)


def test_a_job_whose_worker_keeps_dying_fails_with_worker_lost(store: JobStore) -> None:
    rec = new_job(store)
    outcomes = [store.start(rec.id, max_redeliveries=1)[0] for _ in range(3)]
    assert outcomes == [StartOutcome.run, StartOutcome.run, StartOutcome.lost]
    final = store.get(rec.id)
    assert final is not None and final.state is JobState.failed
    assert final.error is not None and final.error.code == "worker_lost"
    assert final.redeliveries == 1


def test_cancel_queued_never_starts_and_cancel_running_is_a_flag(store: JobStore) -> None:
    queued = new_job(store)
    after = store.request_cancel(queued.id)
    assert after is not None and after.state is JobState.cancelled
    assert store.start(queued.id, max_redeliveries=2)[0] is StartOutcome.skip

    running = new_job(store)
    store.start(running.id, max_redeliveries=2)
    flagged = store.request_cancel(running.id)
    assert flagged is not None and flagged.state is JobState.running and flagged.cancel_requested
    assert store.cancel_requested(running.id)
    # A redelivery of a job flagged for cancellation does not run it again.
    assert store.start(running.id, max_redeliveries=2)[0] is StartOutcome.cancelled
    assert store.get(running.id).state is JobState.cancelled  # type: ignore[union-attr]


def test_progress_only_while_running(store: JobStore) -> None:
    rec = new_job(store)
    assert not store.progress(rec.id, percent=10.0)
    store.start(rec.id, max_redeliveries=2)
    assert store.progress(rec.id, stage="Filter Prune", step=1, total_steps=4, percent=25.0)
    got = store.get(rec.id)
    assert got is not None and (got.stage, got.step, got.percent) == ("Filter Prune", 1, 25.0)
    store.requeue(rec.id, "retrying")
    assert store.get(rec.id).state is JobState.queued  # type: ignore[union-attr]
    assert not store.progress(rec.id, percent=50.0)


def test_racing_transitions_leave_one_state_and_consistent_indexes(store: JobStore) -> None:
    """Cancel and finish race on the same jobs; every job ends in exactly one state, named
    by exactly one state index."""
    jobs = [new_job(store, "race") for _ in range(20)]
    for rec in jobs:
        store.start(rec.id, max_redeliveries=2)
        store.request_cancel(rec.id)  # flag only: the job is running
    barrier = threading.Barrier(2)

    def finish_all(state: JobState) -> None:
        barrier.wait()
        for rec in jobs:
            store.finish(rec.id, state)

    threads = [
        threading.Thread(target=finish_all, args=(s,))
        for s in (JobState.succeeded, JobState.cancelled)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    members = state_index_members(store, "race")
    for rec in jobs:
        final = store.get(rec.id)
        assert final is not None and final.state in (JobState.succeeded, JobState.cancelled)
        holders = [s for s, ids in members.items() if rec.id in ids]
        assert holders == [final.state.value]


def _record(owner: str = "public") -> JobRecord:
    now = time.time()
    return JobRecord(
        id=uuid.uuid4().hex, owner=owner, state=JobState.queued, config=CONFIG,
        created_at=now, updated_at=now,
    )  # fmt: skip


def test_idempotency_key_binds_once_with_its_job_and_can_be_released(store: JobStore) -> None:
    ledger = Ledger(store)

    def create(record: JobRecord, key: str, fp: str) -> Replayed | Refused | None:
        return ledger.create_job(
            record, max_jobs=0, max_bytes=0, upload_bytes=0, idempotency=Idempotency(key, fp, 60)
        )

    first, second, other = _record(), _record(), _record("other")
    assert create(first, "k", "fp1") is None
    assert store.get(first.id) == first  # the binding and the job appear together
    assert create(second, "k", "fp2") == Replayed(first.id, "fp1")
    assert store.get(second.id) is None  # the loser created nothing
    assert create(other, "k", "fp1") is None  # keys are per owner
    store.release_idempotency_key("public", "k", second.id)  # not the bound job: kept
    assert store.idempotent_job("public", "k") == first.id
    store.release_idempotency_key("public", "k", first.id)
    assert store.idempotent_job("public", "k") is None
    # A binding whose job is gone (deleted by an operator) is replaced, not replayed.
    store.r.set(f"{store.prefix}idem:public:stale", f"{'f' * 32} fp")
    assert create(second, "stale", "fp2") is None
    assert store.idempotent_job("public", "stale") == second.id


def test_a_lost_worker_requeues_its_job_until_the_redelivery_budget_is_spent(
    store: JobStore,
) -> None:
    rec = new_job(store)
    assert store.requeue_lost(rec.id, max_redeliveries=1) is None  # queued: nothing to do
    store.start(rec.id, max_redeliveries=1)
    lost = store.requeue_lost(rec.id, max_redeliveries=1)
    assert lost is not None and lost.state is JobState.queued and lost.redeliveries == 1
    assert "worker lost" in lost.message
    assert rec.id in state_index_members(store, "public")["queued"]
    outcome, again = store.start(rec.id, max_redeliveries=1)
    assert outcome is StartOutcome.run and again is not None
    assert (again.attempts, again.redeliveries) == (2, 1)
    final = store.requeue_lost(rec.id, max_redeliveries=1)
    assert final is not None and final.state is JobState.failed and final.error is not None
    assert final.error.code == "worker_lost"
