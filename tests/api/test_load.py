"""Load on a real service: uvicorn on loopback (``flow-compress serve --no-worker``), a real
Celery worker, the real Redis store.

For a bounded 12 s, 100 concurrent clients poll job status while 4 clients submit tiny real
jobs at once (bench/service measures throughput and latency; this test checks that nothing
is lost or refused under concurrency, so it stays small enough for CI's 2 cores). Every
request must succeed (no error, no transport failure), and no job may be lost: every submitted
job runs to ``succeeded`` (the worker keeps working through the queue after the window) and
its queue message is consumed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.worker.support import (
    service_env,
    settings_env,
    start_api,
    start_worker,
    stop,
    wait_for,
)
from worker.broker import redis_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

POLLERS = 100
SUBMITTERS = 4
WINDOW_S = 12.0
POLL_INTERVAL_S = 0.5

JOB: dict[str, Any] = {
    "model": "resnet18",
    "dataset": "digits",
    "input_size": 16,
    "target_macs": 0.7,
    "max_drop": 100.0,
    "device": "cpu",
    "prune": {"steps": 1, "calibration_batches": 1, "ranking": "score"},
    "truncate": {"enabled": False},
    "recovery": {"iters_per_step": 2, "final_iters": 0, "batch_size": 32},
    "data": {"max_train_samples": 128, "max_eval_samples": 100, "eval_batch_size": 100},
    "latency": {"enabled": False},
    "export": {"parity_samples": 4, "formats": ["onnx"]},
}


async def _load(url: str) -> tuple[list[str], Counter[str], int]:
    stats: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=POLLERS + SUBMITTERS + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def submit(i: int) -> str | None:
            try:
                r = await http.post(
                    "/v1/jobs",
                    json={"config": JOB, "weights_uri": "models/w.safetensors"},
                    headers={"Idempotency-Key": f"load-{i}"},
                )
            except httpx.TransportError as exc:
                stats[f"submit transport {type(exc).__name__}"] += 1
                return None
            stats[f"submit {r.status_code}"] += 1
            return str(r.json()["id"]) if r.status_code == 202 else None

        ids = [i for i in await asyncio.gather(*(submit(i) for i in range(SUBMITTERS))) if i]
        deadline = time.monotonic() + WINDOW_S

        async def poll(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                try:
                    r = await http.get(f"/v1/jobs/{rng.choice(ids)}")
                    ok = r.status_code == 200 and r.json()["id"] in ids
                    stats["poll ok" if ok else f"poll {r.status_code}"] += 1
                except httpx.TransportError as exc:
                    stats[f"poll transport {type(exc).__name__}"] += 1
                await asyncio.sleep(POLL_INTERVAL_S * rng.uniform(0.5, 1.5))

        await asyncio.gather(*(poll(i) for i in range(POLLERS)))
    return ids, stats, sum(stats.values())


def test_concurrent_polls_and_submissions_lose_nothing(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    import torch

    from flow_compress.arch.models import build_model, save_weights

    storage = tmp_path / "storage"
    (storage / "models").mkdir(parents=True)
    torch.manual_seed(0)
    save_weights(build_model("resnet18", 10, input_size=16), storage / "models/w.safetensors")
    env = service_env(
        **settings_env(redis_url, key_prefix, storage), FLOW_COMPRESS_SHARED_WEIGHTS_DIRS="models"
    )
    api, url = start_api(env, tmp_path / "api.log")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        started = time.monotonic()
        ids, stats, requests = asyncio.run(_load(url))
        elapsed = time.monotonic() - started
        print(f"load: {requests} requests in {elapsed:.1f} s, {dict(stats)}")
        assert len(ids) == SUBMITTERS, stats
        assert set(stats) == {"submit 202", "poll ok"}, stats
        assert stats["poll ok"] >= POLLERS * 5

        with httpx.Client(base_url=url, timeout=30) as http:

            def all_terminal() -> bool:
                states = [http.get(f"/v1/jobs/{j}").json()["state"] for j in ids]
                return all(s in ("succeeded", "failed", "cancelled") for s in states)

            wait_for(all_terminal, 300, lambda: (tmp_path / "worker.log").read_text()[-3000:])
            jobs = [http.get(f"/v1/jobs/{j}").json() for j in ids]
        states = Counter(j["state"] for j in jobs)
        print(f"jobs: {dict(states)}")
        assert states["succeeded"] == SUBMITTERS, [j["error"] for j in jobs if j["error"]]
        # Every message was consumed.
        queue = redis_client(redis_url)
        wait_for(lambda: queue.llen(f"{key_prefix}celery:gpu") == 0, 120)
        assert list((storage / "uploads").iterdir()) == []
    finally:
        stop(worker)
        stop(api)
