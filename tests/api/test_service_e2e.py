"""End to end, as a newcomer runs it: ``flow-compress serve`` (API, a real Celery worker
process and an embedded Redis; no FLOW_COMPRESS_REDIS_URL) and real compressions of a small
resnet18 on scikit-learn's digits, on CPU.

Checked: progress rises while running; the job succeeds through the CI client (``submit
--wait --download``); the downloaded ONNX model, run in ONNX Runtime on the test split,
reproduces the report's top-1; a running job stops when cancelled and a cancelled queued job
never starts; bad weights end ``failed`` with ``bad_checkpoint``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.cli import EXIT_PREFLIGHT

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT_S = 90
UPLOAD_CAP = 60 * 1024**2  # resnet18's weights (45 MB) fit, the oversize upload does not
JOB_TIMEOUT_S = 480  # generous: CI machines are shared; a healthy run needs ~70 s

# Small enough for two shared CPU cores; large enough to pass through every stage.
TINY: dict[str, Any] = {
    "model": "resnet18",
    "dataset": "digits",
    "input_size": 16,
    "target_macs": 0.6,
    "max_drop": 100.0,  # random base weights: the budget must not stop the plumbing test
    "device": "cpu",
    "prune": {"steps": 2, "calibration_batches": 1, "ranking": "score"},
    "truncate": {"max_layers": 1, "calibration_batches": 1, "n_try": 1},
    "recovery": {"iters_per_step": 5, "trunc_iters": 5, "final_iters": 10, "batch_size": 32},
    "data": {"max_train_samples": 256, "max_eval_samples": 200, "eval_batch_size": 200},
    "latency": {"enabled": False},
    "export": {"parity_samples": 16},
}
# Many short steps towards a far target: long in total, but each step (where the cancel flag
# is checked) is short.
SLOW = {**TINY, "target_macs": 0.2, "prune": {**TINY["prune"], "steps": 30}}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Service:
    url: str
    storage: Path
    log: Path

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    # No FLOW_COMPRESS_* from the caller: serve must start its own embedded Redis.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_COMPRESS_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def cli(*args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=_clean_env(),
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("serve")
    storage, log = root / "storage", root / "serve.log"
    port = _free_port()
    env = _clean_env() | {
        "FLOW_COMPRESS_STORAGE_DIR": str(storage),
        "FLOW_COMPRESS_MAX_UPLOAD_BYTES": str(UPLOAD_CAP),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # same process group: if the test run is killed as a group, serve goes with it
    svc = Service(f"http://127.0.0.1:{port}", storage, log)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"serve exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{svc.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"serve not ready:\n{log.read_text()}"
            time.sleep(0.3)
        yield svc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from flow_compress.arch.models import build_model, save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-digits.safetensors"
    save_weights(build_model("resnet18", 10, in_chans=3, input_size=16), path)
    return path


def submit_http(svc: Service, config: dict[str, Any], weights: Path | bytes) -> str:
    """The README's curl line, in httpx: spec first, then the weights file."""
    data = weights.read_bytes() if isinstance(weights, Path) else weights
    with svc.http() as http:
        r = http.post(
            "/v1/jobs",
            files={"spec": (None, json.dumps({"config": config})), "weights": ("w", data)},
        )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


FINISHED = ("succeeded", "failed", "cancelled")


def poll(
    svc: Service,
    job_id: str,
    done: Callable[[dict[str, Any]], bool] = lambda job: job["state"] in FINISHED,
    timeout: float = JOB_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Poll the job until ``done(job)``; return every observation."""
    seen = []
    deadline = time.monotonic() + timeout
    with svc.http() as http:
        while True:
            job = http.get(f"/v1/jobs/{job_id}").json()
            seen.append(job)
            if done(job):
                return seen
            assert time.monotonic() < deadline, f"{job}\n{svc.log.read_text()[-4000:]}"
            time.sleep(0.2)


def onnx_top1(model: Path, config: dict[str, Any]) -> tuple[float, int]:
    """Top-1 of the exported model on the test split, fed exactly as the library feeds it."""
    import numpy as np
    import onnxruntime as ort

    from flow_compress.config import CompressionConfig
    from flow_compress.data import load_dataset

    cfg = CompressionConfig.model_validate(config)
    size = cfg.input_size
    assert size is not None
    data = load_dataset(cfg.dataset, input_size=size, in_chans=cfg.in_chans, config=cfg.data)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in data.loader("test", 128):
        logits = session.run(None, {name: x.numpy()})[0]
        correct += int((np.argmax(logits, axis=1) == y.numpy()).sum())
        total += len(y)
    return 100.0 * correct / total, total


def test_job_succeeds_with_rising_progress_and_onnx_matches_report(
    service: Service, base_weights: Path, tmp_path: Path
) -> None:
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(TINY))
    download = tmp_path / "artifacts"
    client = subprocess.Popen(
        [
            sys.executable, "-m", "api.cli", "submit",
            "--server", service.url,
            "--config", str(config_file),
            "--weights", str(base_weights),
            "--wait", "--download", str(download),
            "--fail-if-drop-above", "100",
            "--poll-interval", "0.5",
        ],
        cwd=REPO,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert client.stdout is not None
    # submit preflights the job first (POST /v1/preflight), then submits it.
    preflight = [client.stdout.readline()]
    while not preflight[-1].startswith("job ") and preflight[-1]:
        preflight.append(client.stdout.readline())
    assert preflight[0].startswith("preflight: ok"), preflight
    first = preflight[-1].split()
    assert first[0] == "job" and first[2] == "queued", preflight
    job_id = first[1]

    seen = poll(service, job_id)
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, f"{out}\n{err}\n{service.log.read_text()[-4000:]}"
    final = seen[-1]
    assert final["state"] == "succeeded", final
    running = [j["percent"] for j in seen if j["state"] == "running"]
    assert running, "never observed the job running"
    assert running == sorted(running) and len(set(running)) >= 2, running
    assert final["percent"] == 100.0 and final["finished_at"] and final["started_at"]
    assert "succeeded: top-1" in out and "downloaded" in out

    with service.http() as http:
        report = http.get(f"/v1/jobs/{job_id}/report").json()
        listed = {f["name"] for f in http.get(f"/v1/jobs/{job_id}/artifacts").json()["files"]}
    assert {"model.onnx", "model.ts", "weights.safetensors", "report.json"} <= listed
    assert {p.name for p in download.iterdir()} == listed
    assert report["macs_ratio"] < 1.0 and final["result"]["macs_ratio"] == report["macs_ratio"]

    top1, n = onnx_top1(download / "model.onnx", TINY)
    # Same images, same preprocessing: at most one image may flip on float noise.
    assert abs(top1 - report["pruned"]["top1"]) <= 100.0 / n + 1e-6, (top1, report["pruned"])


# A timm architecture no family rules were written for (the structural rules handle it).
AUTO_MODEL = "timm:regnetx_002"


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A timm checkpoint as a user holds one: the model trained briefly on digits (grey,
    16 px) by plain PyTorch, saved as a state dict."""
    import torch

    from flow_compress.arch import AUTO_FAMILY
    from flow_compress.arch.models import build_model, resolve_model
    from flow_compress.config import DataConfig
    from flow_compress.data import load_dataset

    assert resolve_model(AUTO_MODEL).spec.family == AUTO_FAMILY  # no hand-written rules
    torch.manual_seed(0)
    model = build_model(AUTO_MODEL, 10, in_chans=1, input_size=16)
    data = load_dataset("digits", input_size=16, in_chans=1, config=DataConfig())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = data.forever(64, seed=0)
    model.train()
    for _ in range(150):
        x, y = next(batches)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    path = tmp_path_factory.mktemp("timm") / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path


def test_a_timm_checkpoint_compressed_over_http_deploys_from_its_contract_alone(
    service: Service, timm_checkpoint: Path, tmp_path: Path
) -> None:
    """The acceptance of "bring your own model": a timm checkpoint of a family without
    hand-written rules goes through the HTTP API; the downloaded ONNX model, fed raw uint8
    images prepared from nothing but the contract in its metadata, reproduces the report's
    top-1 within 0.5 points."""
    from flow_compress.config import CompressionConfig
    from flow_compress.data import load_dataset
    from tests.flow_compress.test_contract import (
        deploy_contract,
        deploy_normalise,
        deploy_resize,
        onnx_predict,
    )

    config = {**TINY, "model": AUTO_MODEL, "in_chans": 1}
    job_id = submit_http(service, config, timm_checkpoint)
    final = poll(service, job_id)[-1]
    assert final["state"] == "succeeded", f"{final}\n{service.log.read_text()[-4000:]}"
    with service.http() as http:
        report = http.get(f"/v1/jobs/{job_id}/report").json()
        model = tmp_path / "model.onnx"
        model.write_bytes(http.get(f"/v1/jobs/{job_id}/artifacts/model.onnx").content)
    assert report["model"] == AUTO_MODEL and report["macs_ratio"] < 1.0

    # The test split as a deployment holds it: uint8 images at their stored 8x8 size.
    cfg = CompressionConfig.model_validate(config)
    data = load_dataset(cfg.dataset, input_size=16, in_chans=1, config=cfg.data)
    images = data.test.images.permute(0, 2, 3, 1).numpy()  # type: ignore[attr-defined]
    labels = data.test.labels.numpy()  # type: ignore[attr-defined]
    contract = deploy_contract(model)
    assert contract["resize"]["size"] == [16, 16] and images.shape[1] == 8
    x = deploy_normalise(deploy_resize(images, contract), contract)
    predicted = onnx_predict(model, contract["input_name"], x).argmax(1)
    top1 = float((predicted == labels).mean() * 100)
    assert top1 > 30, "the checkpoint was trained: far above the 10 % of chance"
    assert abs(top1 - report["pruned"]["top1"]) <= 0.5, (top1, report["pruned"]["top1"])


def test_cancel_stops_a_running_job_and_a_cancelled_queued_job_never_starts(
    service: Service, base_weights: Path
) -> None:
    running_id = submit_http(service, SLOW, base_weights)
    # Cancel once it is under way: running, with its baseline step reported.
    poll(service, running_id, lambda job: job["state"] == "running" and job["percent"] > 0)
    queued_id = submit_http(service, TINY, base_weights)
    with service.http() as http:
        r = http.delete(f"/v1/jobs/{queued_id}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        r = http.delete(f"/v1/jobs/{running_id}")
        assert r.status_code == 202 and r.json()["cancel_requested"] is True
    final = poll(service, running_id)[-1]
    assert final["state"] == "cancelled", final
    assert final["percent"] < 100
    assert not (service.storage / "scratch" / running_id).exists()
    assert not (service.storage / "artifacts" / running_id).exists()
    assert not (service.storage / "uploads" / running_id).exists()

    # A job queued behind the cancelled one: once it has run, the worker has consumed (and
    # skipped) the cancelled job's message.
    flush_id = submit_http(service, TINY, b"not weights")
    assert poll(service, flush_id)[-1]["state"] == "failed"
    with service.http() as http:
        never = http.get(f"/v1/jobs/{queued_id}").json()
        assert http.get(f"/v1/jobs/{running_id}/artifacts").status_code == 409
    assert never["state"] == "cancelled" and never["started_at"] is None
    assert never["attempts"] == 0


def test_bad_weights_fail_with_bad_checkpoint_through_the_ci_client(
    service: Service, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 1024)
    args = [
        "submit", "--server", service.url, "--model", "resnet18", "--dataset", "digits",
        "--weights", str(garbage), "--set", "input_size=16", "--set", "device=cpu",
        "--set", 'export.formats=["torchscript"]', "--wait", "--poll-interval", "0.3",
    ]  # fmt: skip
    # The preflight sees it first: nothing is submitted.
    with service.http() as http:
        before = http.get("/v1/jobs").json()["total"]
    checked = cli(*args)
    assert checked.returncode == EXIT_PREFLIGHT, checked
    assert "weights do not fit" in checked.stdout and "preflight_failed" in checked.stderr
    with service.http() as http:
        assert http.get("/v1/jobs").json()["total"] == before
    # Submitted anyway, the worker refuses them with the same code.
    result = cli(*args, "--no-preflight")
    assert result.returncode == 1, result
    assert "error: bad_checkpoint:" in result.stderr
    job_id = result.stdout.split()[1]
    status = cli("status", job_id, "--server", service.url, "--json", timeout=60)
    assert status.returncode == 1
    job = json.loads(status.stdout)
    assert job["state"] == "failed" and job["error"]["code"] == "bad_checkpoint"
    assert cli("status", "0" * 32, "--server", service.url, timeout=60).returncode == 4


def test_refusals_from_the_live_service(service: Service, base_weights: Path) -> None:
    """Unknown id, oversize upload, hostile archive: refused before anything is queued."""
    import io
    import zipfile

    spec = json.dumps({"config": {**TINY, "dataset": "upload"}})
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/0.png", b"png")
        zf.writestr("../../escape.png", b"png")
    with service.http() as http:
        before = http.get("/v1/jobs").json()["total"]
        r = http.get(f"/v1/jobs/{'f' * 32}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = http.post(
            "/v1/jobs",
            files={"spec": (None, spec), "weights": ("w", b"\0" * (UPLOAD_CAP + 1))},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = http.post(
            "/v1/jobs",
            files={
                "spec": (None, spec),
                "weights": ("w", base_weights.read_bytes()),
                "dataset": ("ds.zip", archive.getvalue()),
            },
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_archive"
        # A GPU deployment on a CPU-only installation: refused once the worker has said
        # (with its heartbeat) what it can run.
        if not Path("/dev/nvidia0").exists():
            deadline = time.monotonic() + 120
            while not re.search(
                r'flow_compress_workers\{queue="[^"]+"\} [1-9]', http.get("/metrics").text
            ):
                assert time.monotonic() < deadline, "no worker heartbeat"
                time.sleep(0.5)
            gpu = {**TINY, "target_speedup": 2.0, "deployment": {"device": "cuda"}}
            r = http.post("/v1/jobs", json={"config": gpu})
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["code"] == "deployment_unavailable" and "CUDA" in err["message"]
            assert err["field"] == "config.deployment"
        assert http.get("/v1/jobs").json()["total"] == before
    assert list((service.storage / "uploads").iterdir()) == []
    assert not any(service.storage.parent.rglob("escape.png"))
