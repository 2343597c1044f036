"""/metrics in process (the real app, Redis and Celery producer; no worker): the exposition
parses, requests are labelled by route template, the jobs gauge and the queue depth follow
submissions and cancels, the token setting guards the route, jobs stored before the state
indexes existed are counted, and a Redis outage is reported, not a 500. A real worker's
heartbeat and stage histogram are checked end to end in test_ops_e2e.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.settings import ApiSettings
from tests.api.conftest import storage_of, store_of
from worker.jobs import JobState
from worker.telemetry import StageClock, read_stage_histograms, record_stage

CONFIG: dict[str, Any] = {"model": "resnet18", "dataset": "digits", "target_macs": 0.5}
Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    found = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def scrape(client: TestClient, **headers: str) -> Samples:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def submit(client: TestClient) -> str:
    path = storage_of(client).root / "models" / "w.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    r = client.post("/v1/jobs", json={"config": CONFIG, "weights_uri": "models/w.bin"})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_jobs_queue_and_requests(client: TestClient) -> None:
    m = scrape(client)
    assert value(m, "flow_compress_store_up") == 1
    assert all(value(m, "flow_compress_jobs", state=s.value) == 0 for s in JobState)
    assert value(m, "flow_compress_queue_depth", queue="gpu") == 0
    assert value(m, "flow_compress_workers", queue="gpu") == 0

    first, second = submit(client), submit(client)
    for job_id in (first, second, first):
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert client.get("/v1/jobs/" + "0" * 32).status_code == 404
    assert client.get("/no/such/route/" + first).status_code == 404
    m = scrape(client)
    assert value(m, "flow_compress_jobs", state="queued") == 2
    assert value(m, "flow_compress_queue_depth", queue="gpu") == 2  # no worker takes them
    route = "/v1/jobs/{job_id}"
    assert (
        value(m, "flow_compress_http_requests_total", method="GET", route=route, status="200") == 3
    )
    assert (
        value(m, "flow_compress_http_requests_total", method="GET", route=route, status="404") == 1
    )
    assert (
        value(m, "flow_compress_http_requests_total", method="POST", route="/v1/jobs", status="202")
        == 2
    )
    assert (
        value(
            m, "flow_compress_http_requests_total", method="GET", route="<unmatched>", status="404"
        )
        == 1
    )
    count = value(
        m,
        "flow_compress_http_request_duration_seconds_count",
        method="GET",
        route=route,
        status="200",
    )
    assert count == 3
    assert first not in client.get("/metrics").text  # route templates, not raw paths
    assert value(m, "flow_compress_storage_bytes", area="uploads") >= 0

    assert client.delete(f"/v1/jobs/{first}").status_code == 200
    m = scrape(client)
    assert value(m, "flow_compress_jobs", state="queued") == 1
    assert value(m, "flow_compress_jobs", state="cancelled") == 1


def test_the_metrics_token_guards_the_route(make_client: Callable[..., TestClient]) -> None:
    client = make_client(metrics_token="scrape-me-please", api_keys=["tenant-key"])
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    # An API key is not the metrics token.
    assert client.get("/metrics", headers={"Authorization": "Bearer tenant-key"}).status_code == 401
    assert (
        client.get("/metrics", headers={"Authorization": "Bearer scrape-me-please"}).status_code
        == 200
    )
    assert client.get("/metrics").json()["error"]["code"] == "unauthorized"


def test_jobs_stored_before_the_state_indexes_are_counted(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    store = store_of(client)
    ids = [submit(client) for _ in range(3)]
    client.delete(f"/v1/jobs/{ids[0]}")
    # As a store written by an older version: no jobs-in indexes.
    store.r.delete(*[f"{store.prefix}jobs-in:{s.value}" for s in JobState])
    fresh = make_client()  # a new API process: indexes once, at its first scrape
    m = scrape(fresh)
    assert value(m, "flow_compress_jobs", state="queued") == 2
    assert value(m, "flow_compress_jobs", state="cancelled") == 1
    assert store.r.exists(f"{store.prefix}jobs-in:indexed")


def test_a_redis_outage_is_reported_not_raised(
    make_client: Callable[..., TestClient], tmp_path: Any
) -> None:
    settings = ApiSettings(
        redis_url="redis://127.0.0.1:1/0", key_prefix="x:", storage_dir=tmp_path / "s"
    )
    with TestClient(create_app(settings)) as client:
        m = scrape(client)
    assert value(m, "flow_compress_store_up") == 0
    assert "flow_compress_jobs" not in m


def test_stage_histogram_from_redis(client: TestClient) -> None:
    store = store_of(client)
    clock_now = [0.0]
    clock = StageClock(
        lambda stage, s: record_stage(store.r, store.prefix, stage, s), clock=lambda: clock_now[0]
    )
    # Events mark the end of a step: Baseline ends at 2 s, Filter Prune at 2+40 s, Export at 50.
    for t, stage in ((2, "Baseline"), (20, "Filter Prune"), (42, "Filter Prune"), (50, "Export")):
        clock_now[0] = t
        clock.event(stage)
    clock.finish()
    raw = store.r.hgetall(f"{store.prefix}metrics:stage_seconds")
    hists = {h.stage: h for h in read_stage_histograms(raw)}  # type: ignore[arg-type]
    assert hists["Baseline"].sum == 2 and hists["Filter Prune"].sum == 40
    assert hists["Export"].sum == 8
    m = scrape(client)
    assert (
        value(m, "flow_compress_stage_duration_seconds_bucket", stage="Filter Prune", le="30.0")
        == 0
    )
    assert (
        value(m, "flow_compress_stage_duration_seconds_bucket", stage="Filter Prune", le="60.0")
        == 1
    )
    assert value(m, "flow_compress_stage_duration_seconds_count", stage="Export") == 1


def test_a_redis_error_while_recording_a_stage_does_not_fail_the_job() -> None:
    def broken(stage: str, seconds: float) -> None:
        raise redis.ConnectionError("down")

    clock = StageClock(broken)
    clock.event("Baseline")
    clock.event("Filter Prune")  # records Baseline: swallowed and logged
    clock.finish()
