"""GET /v1/jobs/{id}/events (Server-Sent Events) and GET /v1/jobs/{id}/logs, against a real
uvicorn API process, a real Redis and, for the worker's side, a real Celery worker.

Checked: a stream replays what is stored, then follows the job live (an event reaches the
client as soon as the store commits it), sends heartbeat comments while idle and ends after
the terminal state; ``Last-Event-ID`` resumes exactly after the last event seen (mid-run and
after the end, where the answer is 204); an expired stream still ends with the job's state;
owners are isolated (404, 401); the worker publishes its progress and log lines and the log
pages with ``?after=``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import owner_for_key
from tests.worker.support import service_env, settings_env, start_api, start_worker, stop
from worker.broker import redis_client
from worker.jobs import JobError, JobRecord, JobState
from worker.store import JobStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ALICE, BOB = "key-alice", "key-bob"
CONFIG = {"model": "resnet18", "dataset": "digits", "input_size": 8, "device": "cpu"}
PING_S = 0.5


@dataclass
class Service:
    url: str
    store: JobStore
    logs: Path

    def http(self, key: str | None = ALICE) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def service(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("events")
    prefix = f"fc-test-{uuid.uuid4().hex[:12]}:"
    env = service_env(
        **settings_env(redis_url, prefix, root / "storage"),
        FLOW_COMPRESS_API_KEYS=f"{ALICE},{BOB}",
        FLOW_COMPRESS_SSE_PING_S=str(PING_S),
    )
    api, url = start_api(env, root / "api.log")
    worker = start_worker(env, root / "worker.log")
    client = redis_client(redis_url)
    try:
        yield Service(url, JobStore(client, prefix), root)
    finally:
        stop(worker)
        stop(api)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def new_job(store: JobStore, key: str = ALICE) -> str:
    """A job record straight in the store (no worker will see it): the test drives it."""
    now = time.time()
    job_id = uuid.uuid4().hex
    store.create(
        JobRecord.model_validate(
            {
                "id": job_id,
                "owner": owner_for_key(key),
                "state": "queued",
                "config": CONFIG,
                "created_at": now,
                "updated_at": now,
                "message": "queued",
            }
        )
    )
    return job_id


# ---------------------------------------------------------------------------- an SSE client
@dataclass
class Event:
    id: str | None
    type: str
    data: dict[str, Any]
    at: float  # monotonic time of arrival


@dataclass
class Stream:
    """Reads one SSE response in a thread; events and heartbeats land in a queue."""

    status: int = 0
    items: queue.Queue[Event | str | None] = field(default_factory=queue.Queue)
    thread: threading.Thread | None = None
    response: httpx.Response | None = None

    def next(self, timeout: float = 20) -> Event | str | None:
        return self.items.get(timeout=timeout)

    def next_event(self, timeout: float = 20) -> Event:
        while True:
            item = self.next(timeout)
            if isinstance(item, Event):
                return item
            assert item is not None, "the stream ended"

    def rest(self, timeout: float = 30) -> list[Event]:
        """Every event until the stream ends."""
        out = []
        while (item := self.next(timeout)) is not None:
            if isinstance(item, Event):
                out.append(item)
        return out

    def close(self) -> None:
        if self.response is not None:
            self.response.close()


def open_stream(svc: Service, job_id: str, last_id: str | None = None, key: str = ALICE) -> Stream:
    stream = Stream()
    ready = threading.Event()

    def run() -> None:
        headers = {"X-API-Key": key, "Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        try:
            url = f"{svc.url}/v1/jobs/{job_id}/events"
            with (
                httpx.Client(timeout=httpx.Timeout(30, read=60)) as http,
                http.stream("GET", url, headers=headers) as r,
            ):
                stream.status, stream.response = r.status_code, r
                ready.set()
                if r.status_code != 200:
                    return
                assert r.headers["content-type"].startswith("text/event-stream")
                block: list[str] = []
                for line in r.iter_lines():
                    if line:
                        block.append(line)
                        continue
                    fields: dict[str, str] = {}
                    for part in block:
                        if part.startswith(":"):
                            stream.items.put(part)
                            continue
                        name, _, value = part.partition(":")
                        fields[name] = fields.get(name, "") + value.removeprefix(" ")
                    if "data" in fields:
                        stream.items.put(
                            Event(
                                fields.get("id"),
                                fields.get("event", "message"),
                                json.loads(fields["data"]),
                                time.monotonic(),
                            )
                        )
                    block = []
        except httpx.HTTPError:
            pass  # closed by the test
        finally:
            ready.set()
            stream.items.put(None)

    stream.thread = threading.Thread(target=run, daemon=True)
    stream.thread.start()
    assert ready.wait(30)
    return stream


def id_key(event_id: str | None) -> tuple[int, int]:
    assert event_id is not None
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


# ---------------------------------------------------------------------------- the tests
def test_stream_replays_follows_live_beats_and_ends_at_the_terminal_state(
    service: Service,
) -> None:
    store = service.store
    job_id = new_job(store)
    store.start(job_id, max_redeliveries=2)
    store.progress(job_id, stage="Baseline", step=1, total_steps=1, percent=5.0, macs=1000)

    stream = open_stream(service, job_id)
    assert stream.status == 200
    replayed = [stream.next_event() for _ in range(3)]
    assert [e.data["state"] for e in replayed] == ["queued", "running", "running"]
    assert replayed[-1].data["percent"] == 5.0 and replayed[-1].data["macs"] == 1000
    assert all(e.type == "job" for e in replayed)

    # Live: an event arrives as soon as it is committed.
    sent = time.monotonic()
    store.progress(job_id, stage="Filter Prune", step=1, total_steps=2, percent=32.5, top1=91.0)
    live = stream.next_event(timeout=5)
    assert live.data["stage"] == "Filter Prune" and live.data["top1"] == 91.0
    assert live.at - sent < 2.0, live.at - sent

    # Idle: heartbeat comments keep the connection open.
    beats = 0
    deadline = time.monotonic() + 10
    while beats < 2 and time.monotonic() < deadline:
        item = stream.next(timeout=5)
        assert isinstance(item, str), item
        beats += item.startswith(": ping")
    assert beats >= 2

    store.finish(job_id, JobState.succeeded, result={"top1": 90.0}, message="succeeded")
    rest = stream.rest()
    assert [e.data["state"] for e in rest] == ["succeeded"]
    assert rest[0].data["result"] == {"top1": 90.0} and rest[0].data["percent"] == 100.0
    assert stream.thread is not None
    stream.thread.join(10)
    assert not stream.thread.is_alive(), "the stream did not end after the terminal state"
    ids = [id_key(e.id) for e in [*replayed, live, *rest]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_last_event_id_resumes_exactly_after_the_last_event_seen(service: Service) -> None:
    store = service.store
    job_id = new_job(store)
    store.start(job_id, max_redeliveries=2)
    store.progress(job_id, stage="Baseline", step=1, total_steps=1, percent=5.0)

    # Mid-run: read what is there, drop the connection, miss two events, come back.
    first = open_stream(service, job_id)
    seen = [first.next_event() for _ in range(3)]
    first.close()
    store.progress(job_id, stage="Filter Prune", step=1, total_steps=2, percent=32.5)
    store.progress(job_id, stage="Filter Prune", step=2, total_steps=2, percent=60.0)
    again = open_stream(service, job_id, last_id=seen[-1].id)
    missed = [again.next_event() for _ in range(2)]
    assert [e.data["percent"] for e in missed] == [32.5, 60.0]
    store.request_cancel(job_id)
    store.finish(job_id, JobState.cancelled, message="cancelled while running")
    tail = again.rest()
    assert [e.data["state"] for e in tail] == ["running", "cancelled"]
    assert tail[0].data["cancel_requested"] is True

    # After the end: a full replay, any suffix of it, and 204 once nothing is left.
    everything = open_stream(service, job_id).rest()
    assert [e.id for e in everything] == [e.id for e in [*seen, *missed, *tail]]
    for k in (0, 3, len(everything) - 2):
        suffix = open_stream(service, job_id, last_id=everything[k].id).rest()
        assert [e.id for e in suffix] == [e.id for e in everything[k + 1 :]]
    assert open_stream(service, job_id, last_id=everything[-1].id).status == 204


def test_a_finished_job_whose_events_expired_still_ends_with_its_state(
    service: Service,
) -> None:
    store = service.store
    job_id = new_job(store)
    store.start(job_id, max_redeliveries=2)
    store.finish(
        job_id, JobState.failed, error=JobError(code="bad_checkpoint", message="not weights")
    )
    store.r.delete(store.streams.events_key(job_id))
    only = open_stream(service, job_id).rest()
    assert len(only) == 1 and only[0].data["state"] == "failed"
    assert only[0].data["error"]["code"] == "bad_checkpoint"
    assert open_stream(service, job_id, last_id=only[0].id).status == 204


def test_events_and_logs_are_isolated_and_validated(service: Service) -> None:
    job_id = new_job(service.store, ALICE)
    unknown = uuid.uuid4().hex
    for path in (f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/logs"):
        with service.http(BOB) as bob:
            r = bob.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
            assert bob.get(path.replace(job_id, unknown)).status_code == 404
        with service.http(None) as anonymous:
            assert anonymous.get(path).status_code == 401
    with service.http() as alice:
        r = alice.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "abc"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
        r = alice.get(f"/v1/jobs/{job_id}/logs", params={"after": "1-2-3"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "query.after"
        r = alice.get(f"/v1/jobs/{job_id}/logs")
        assert r.status_code == 200 and r.json() == {
            "job_id": job_id,
            "items": [],
            "next_after": None,
        }


def test_the_worker_publishes_its_events_and_log_lines(service: Service) -> None:
    """A real job through the real worker: garbage weights, so it fails fast, after running."""
    with service.http() as alice:
        r = alice.post(
            "/v1/jobs",
            files={
                "spec": (None, json.dumps({"config": CONFIG})),
                "weights": ("w.safetensors", b"\x00" * 64),
            },
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
    events = open_stream(service, job_id).rest(timeout=180)
    states = [e.data["state"] for e in events]
    assert states[0] == "queued" and "running" in states and states[-1] == "failed", states
    assert events[-1].data["error"]["code"] == "bad_checkpoint"

    with service.http() as alice:
        page = alice.get(f"/v1/jobs/{job_id}/logs").json()
        lines = page["items"]
        text = "\n".join(f"{line['logger']} {line['level']} {line['message']}" for line in lines)
        assert f"worker.tasks INFO job {job_id}: running (attempt 1)" in text, text
        assert f"job {job_id} failed: [bad_checkpoint]" in text, text
        assert page["next_after"] == lines[-1]["id"]
        # Paging with the cursor walks the same lines, in order, and then finds nothing new.
        walked, after = [], None
        while True:
            params = {"limit": 1, **({"after": after} if after else {})}
            step = alice.get(f"/v1/jobs/{job_id}/logs", params=params).json()
            if not step["items"]:
                assert step["next_after"] == after
                break
            walked += step["items"]
            after = step["next_after"]
        assert walked == lines
    with service.http(BOB) as bob:
        assert bob.get(f"/v1/jobs/{job_id}/logs").status_code == 404
