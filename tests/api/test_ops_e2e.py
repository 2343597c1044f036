"""Metrics and webhooks end to end: a real API (uvicorn), a real Celery worker and a real
Redis, tiny real compressions, a real webhook receiver on loopback.

Checked: a job's run shows in /metrics (running then succeeded in the jobs gauge, the worker
busy then idle, its stages in the stage histogram, its polls under the route template) as
parsed by ``prometheus_client.parser``; its webhook, refused twice by the receiver (a 500,
then a timeout), arrives on the third attempt with one delivery id and a valid signature,
and the job shows the delivery; a receiver that always fails leaves the delivery failed
after the retry bound and the job succeeded. The secret appears in no view and no log.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.client import verify_signature
from tests.api.receiver import receiver
from tests.worker.support import (
    service_env,
    settings_env,
    start_api,
    start_worker,
    stop,
    wait_for,
)
from worker.broker import redis_client
from worker.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

JOB_TIMEOUT_S = 300
SECRET = "e2e-webhook-secret-0123456789"
JOB: dict[str, Any] = {
    "model": "resnet18",
    "dataset": "digits",
    "input_size": 16,
    "target_macs": 0.7,
    "max_drop": 100.0,  # random base weights: the budget must not stop the plumbing test
    "device": "cpu",
    "prune": {"steps": 1, "calibration_batches": 1, "ranking": "score"},
    "truncate": {"enabled": False},
    "recovery": {"iters_per_step": 2, "final_iters": 0, "batch_size": 32},
    "data": {"max_train_samples": 128, "max_eval_samples": 100, "eval_batch_size": 100},
    "latency": {"enabled": False},
    "export": {"parity_samples": 4, "formats": ["onnx"]},
}


@dataclass
class Ops:
    url: str
    logs: list[Path]

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


@pytest.fixture(scope="module")
def ops(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    import torch

    from flow_compress.arch.models import build_model, save_weights

    root = tmp_path_factory.mktemp("ops")
    storage = root / "storage"
    (storage / "models").mkdir(parents=True)
    torch.manual_seed(0)
    save_weights(build_model("resnet18", 10, input_size=16), storage / "models/w.safetensors")
    prefix = f"fc-test-{uuid.uuid4().hex[:12]}:"
    env = service_env(
        **settings_env(redis_url, prefix, storage),
        FLOW_COMPRESS_SHARED_WEIGHTS_DIRS="models",
        FLOW_COMPRESS_HEARTBEAT_INTERVAL_S="0.5",
        FLOW_COMPRESS_WEBHOOK_TIMEOUT_S="1",
        FLOW_COMPRESS_WEBHOOK_BACKOFF_S="0.2",
        FLOW_COMPRESS_WEBHOOK_MAX_ELAPSED_S="5",
        FLOW_COMPRESS_METRICS_STORAGE_INTERVAL_S="0",
    )
    api_log, worker_log = root / "api.log", root / "worker.log"
    api, url = start_api(env, api_log)
    worker = None
    try:
        worker = start_worker(env, worker_log)
        yield Ops(url, [api_log, worker_log])
    finally:
        if worker is not None:
            stop(worker)
        stop(api)
        client = redis_client(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def scrape(http: httpx.Client) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], from the parsed exposition."""
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(
    metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    found = [
        v for lab, v in metrics.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(found) == 1, (name, labels, metrics.get(name))
    return found[0]


def submit(http: httpx.Client, hook_url: str) -> str:
    spec = {
        "config": JOB,
        "weights_uri": "models/w.safetensors",
        "notify": {"url": hook_url, "secret": SECRET},
    }
    r = http.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def wait_delivery(http: httpx.Client, job_id: str, ops: Ops) -> dict[str, Any]:
    job: dict[str, Any] = {}

    def settled() -> bool:
        nonlocal job
        job = http.get(f"/v1/jobs/{job_id}").json()
        delivery = job.get("delivery") or {}
        return job["state"] in ("succeeded", "failed") and delivery.get("state") in (
            "delivered",
            "failed",
        )

    wait_for(settled, JOB_TIMEOUT_S, lambda: json.dumps(job) + ops.logs[1].read_text()[-3000:])
    return job


def test_a_job_run_shows_in_metrics_and_its_webhook_arrives_after_retries(ops: Ops) -> None:
    with ops.http() as http, receiver([500, "slow", 200], slow_s=2.0) as hook:
        before = scrape(http)
        assert value(before, "flow_compress_workers", queue="gpu") == 1
        assert value(before, "flow_compress_workers_busy", queue="gpu") == 0
        job_id = submit(http, hook.url)
        seen_running = seen_busy = False
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while http.get(f"/v1/jobs/{job_id}").json()["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, ops.logs[1].read_text()[-3000:]
            m = scrape(http)
            seen_running |= value(m, "flow_compress_jobs", state="running") == 1
            seen_busy |= value(m, "flow_compress_workers_busy", queue="gpu") == 1
            time.sleep(0.2)
        job = wait_delivery(http, job_id, ops)
        assert job["state"] == "succeeded", job
        assert seen_running and seen_busy

        # The heartbeat catches up within an interval or two.
        wait_for(lambda: value(scrape(http), "flow_compress_workers_busy", queue="gpu") == 0, 10)
        m = scrape(http)
        assert value(m, "flow_compress_jobs", state="succeeded") == 1
        assert value(m, "flow_compress_jobs", state="running") == 0
        assert value(m, "flow_compress_workers", queue="gpu") == 1
        assert value(m, "flow_compress_queue_depth", queue="gpu") == 0
        stages = {lab["stage"] for lab, _ in m["flow_compress_stage_duration_seconds_count"]}
        assert {"Baseline", "Filter Prune", "Export"} <= stages, stages
        for stage in ("Filter Prune", "Export"):
            count = value(m, "flow_compress_stage_duration_seconds_count", stage=stage)
            assert count == 1
            assert value(m, "flow_compress_stage_duration_seconds_sum", stage=stage) > 0
            inf = value(m, "flow_compress_stage_duration_seconds_bucket", stage=stage, le="+Inf")
            assert inf == count
        polls = value(
            m,
            "flow_compress_http_requests_total",
            method="GET",
            route="/v1/jobs/{job_id}",
            status="200",
        )
        assert polls >= 2
        # Routes are templates: no job id ever becomes a label value.
        assert job_id not in http.get("/metrics").text
        assert value(m, "flow_compress_storage_bytes", area="artifacts") > 0

        delivery = job["delivery"]
        assert delivery["state"] == "delivered", delivery
        assert delivery["attempts"] == 3 and delivery["last_status"] == 200
        assert len(hook.requests) == 3
        assert {r.headers[DELIVERY_HEADER] for r in hook.requests} == {delivery["id"]}
        assert {r.headers[EVENT_HEADER] for r in hook.requests} == {"job.succeeded"}
        for r in hook.requests:
            assert verify_signature(SECRET, r.body, r.headers[SIGNATURE_HEADER])
        payload = json.loads(hook.requests[-1].body)
        assert payload["job"]["id"] == job_id and payload["job"]["state"] == "succeeded"
        assert payload["job"]["result"]["macs_ratio"] == job["result"]["macs_ratio"]
        assert SECRET not in json.dumps(job)


def test_a_receiver_that_always_fails_leaves_the_delivery_failed_and_the_job_succeeded(
    ops: Ops,
) -> None:
    with ops.http() as http, receiver([500]) as hook:
        job_id = submit(http, hook.url)
        job = wait_delivery(http, job_id, ops)
        assert job["state"] == "succeeded"
        delivery = job["delivery"]
        assert delivery["state"] == "failed"
        assert delivery["last_status"] == 500 and delivery["last_error"] == "HTTP 500"
        assert delivery["attempts"] == len(hook.requests) >= 3
        # Retries stopped within the bound (5 s after the end, plus one attempt's time).
        assert hook.requests[-1].at - delivery["created_at"] <= 5 + 1.5
        assert {r.headers[DELIVERY_HEADER] for r in hook.requests} == {delivery["id"]}
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"
    for log in ops.logs:
        assert SECRET not in log.read_text()
