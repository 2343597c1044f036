"""An operator's own architecture through the HTTP API, with a real API and a real Celery
worker (issue 12, item 4): the example plug-in package (tests/plugins/acme_models) is installed
into a temporary folder on both processes' PYTHONPATH; the worker publishes its catalogue
(with the plug-in's name and the timm/torchvision names) to Redis at start-up, the API
validates submissions against it, and a tiny digits job of the plug-in's model succeeds."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.plugins.support import install_acme
from tests.worker.support import (
    REPO,
    key_prefix,
    redis_url,
    service_env,
    settings_env,
    start_api,
    start_worker,
    stop,
    wait_for,
)
from worker.broker import redis_client
from worker.catalogue import catalogue_key

__all__ = ["key_prefix", "redis_url"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY: dict[str, Any] = {
    "model": "acme_tinynet",
    "dataset": "digits",
    "input_size": 16,
    "target_macs": 0.6,
    "max_drop": 100.0,
    "device": "cpu",
    "prune": {"steps": 1, "calibration_batches": 1},
    "truncate": {"max_layers": 1, "calibration_batches": 1, "n_try": 1, "tau": 100.0},
    "recovery": {"iters_per_step": 3, "trunc_iters": 2, "final_iters": 3, "batch_size": 16},
    "data": {"max_train_samples": 128, "max_eval_samples": 64, "eval_batch_size": 64},
    "latency": {"enabled": False},
    "export": {"parity_samples": 8},
}


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_acme(tmp_path_factory.mktemp("acme"))


@pytest.fixture
def service(
    acme: Path, redis_url: str, key_prefix: str, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    storage = tmp_path / "storage"
    env = service_env(**settings_env(redis_url, key_prefix, storage))
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{acme}"
    worker = start_worker(env, tmp_path / "worker.log")
    api, url = start_api(env, tmp_path / "api.log")
    try:
        client = redis_client(redis_url)
        wait_for(
            lambda: client.get(catalogue_key(key_prefix)) is not None,
            300,
            lambda: (tmp_path / "worker.log").read_text()[-3000:],
        )
        client.close()
        yield url, tmp_path / "worker.log"
    finally:
        stop(api)
        stop(worker)


def weights_of_tinynet(acme: Path, path: Path) -> Path:
    import sys

    sys.path.insert(0, str(acme))
    try:
        import torch
        from acme_models.nets import TinyNet  # type: ignore[import-not-found]

        from flow_compress.arch.models import save_weights

        torch.manual_seed(0)
        save_weights(TinyNet(10, 3), path)
    finally:
        sys.path.remove(str(acme))
    return path


def submit(http: httpx.Client, config: dict[str, Any], weights: bytes) -> httpx.Response:
    return http.post(
        "/v1/jobs",
        files={"spec": (None, json.dumps({"config": config})), "weights": ("w", weights)},
    )


def test_a_plugin_model_is_validated_and_compressed_through_the_api(
    service: tuple[str, Path], acme: Path, tmp_path: Path
) -> None:
    url, worker_log = service
    weights = weights_of_tinynet(acme, tmp_path / "tinynet.safetensors").read_bytes()
    with httpx.Client(base_url=url, timeout=30) as http:
        # the published catalogue decides: timm names are known, typos and ambiguity refused
        for name, words in {
            "acme_tinynt": "did you mean: acme_tinynet",
            "tf_efficientnet_lite9": "timm:tf_efficientnet_lite0",
            "efficientnet_b5": "add a prefix",
        }.items():
            r = submit(http, {**TINY, "model": name}, weights)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "unsupported_model"
            assert words in r.json()["error"]["message"]
        r = submit(http, TINY, weights)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 600
        while (job := http.get(f"/v1/jobs/{job_id}").json())["state"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, worker_log.read_text()[-4000:]
            time.sleep(0.5)
        assert job["state"] == "succeeded", (job, worker_log.read_text()[-4000:])
        report = http.get(f"/v1/jobs/{job_id}/report").json()
    assert report["model"] == "acme_tinynet"
    assert report["pruned"]["macs"] < report["base"]["macs"]
    assert "acme_broken" in worker_log.read_text()  # the broken plug-in was named, not fatal
