"""Retention, quotas and storage: what a job leaves, what the cleaner costs, what quotas add.

    python -m bench.storage [--jobs 200] [--submissions 300] [--skip-tiny] [--out DIR]

1. *Footprint*: a tiny real job (resnet18 on digits at 16 px, the end-to-end tests' config)
   through ``flow-compress serve --no-worker`` and ``flow-compress worker`` on the local
   folder: bytes under uploads/, scratch/ and artifacts/ while queued, once succeeded, and
   after a retention sweep.
2. *Cleaner*: ``--jobs`` finished jobs, each with an upload and three artifacts, expired by
   one sweep (``Cleaner.run_once``), on the local folder and on S3 (moto's server).
3. *Quota check*: ``--submissions`` sequential JSON submissions (one client, ``weights_uri``)
   against a real API process with quotas off and on; and in-process, the job insertion
   alone: ``JobStore.create`` (MULTI) against the quota-checking Lua script.

Everything runs on 127.0.0.1 with its own embedded Redis and throw-away folders.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO, log, machine, md_table, percentile, write_json, write_text

TINY: dict[str, Any] = {
    "model": "resnet18",
    "dataset": "digits",
    "input_size": 16,
    "target_macs": 0.6,
    "max_drop": 100.0,
    "device": "cpu",
    "prune": {"steps": 2, "calibration_batches": 1, "ranking": "score"},
    "truncate": {"max_layers": 1, "calibration_batches": 1, "n_try": 1},
    "recovery": {"iters_per_step": 5, "trunc_iters": 5, "final_iters": 10, "batch_size": 32},
    "data": {"max_train_samples": 256, "max_eval_samples": 200, "eval_batch_size": 200},
    "latency": {"enabled": False},
    "export": {"parity_samples": 16},
}
CONFIG = {"model": "resnet18", "dataset": "digits", "target_macs": 0.5}
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_COMPRESS_")}
    return env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | settings


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "service exited"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer"
        time.sleep(0.2)


def _api(env: dict[str, str], logfile: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--no-worker", "--port", str(port),
             "--log-level", "warning"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/healthz", proc)
    return proc, url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _du(root: Path) -> dict[str, int]:
    return {
        part: sum(p.stat().st_size for p in (root / part).rglob("*") if p.is_file())
        for part in ("uploads", "scratch", "artifacts")
    }


# ---------------------------------------------------------------------------- 1. footprint
def footprint(redis_url: str, work: Path) -> dict[str, Any]:
    import torch

    from flow_compress.arch.models import build_model, save_weights
    from worker.broker import redis_client
    from worker.retention import Cleaner
    from worker.settings import WorkerSettings
    from worker.storage import Storage
    from worker.store import JobStore

    torch.manual_seed(0)
    weights = work / "w.safetensors"
    save_weights(build_model("resnet18", 10, in_chans=3, input_size=16), weights)
    root = work / "footprint"
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    settings = {
        "FLOW_COMPRESS_REDIS_URL": redis_url,
        "FLOW_COMPRESS_KEY_PREFIX": prefix,
        "FLOW_COMPRESS_STORAGE_DIR": str(root),
        "FLOW_COMPRESS_RETENTION_S": "3600",
    }
    api, url = _api(_env(**settings), work / "api.log")
    out: dict[str, Any] = {"weights_bytes": weights.stat().st_size}
    worker = None
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            spec = json.dumps({"config": TINY})
            r = http.post(
                "/v1/jobs", files={"spec": (None, spec), "weights": ("w", weights.read_bytes())}
            )
            job_id = r.json()["id"]
            out["queued"] = _du(root)
            log_file = work / "worker.log"
            with log_file.open("ab") as fh:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "api.cli", "worker"],
                    cwd=REPO, env=_env(**settings), stdout=fh, stderr=subprocess.STDOUT,
                )  # fmt: skip
            started = time.monotonic()
            while (job := http.get(f"/v1/jobs/{job_id}").json())["state"] not in (
                "succeeded", "failed", "cancelled",
            ):  # fmt: skip
                assert time.monotonic() - started < 900, "the tiny job took too long"
                time.sleep(1)
            out["state"] = job["state"]
            out["job_wall_s"] = round(time.monotonic() - started, 1)
            out["succeeded"] = _du(root)
            out["usage_bytes_succeeded"] = http.get("/v1/usage").json()["usage"]["stored_bytes"]
        client = redis_client(redis_url)
        store = JobStore(client, prefix)
        ws = WorkerSettings(storage_dir=root, retention_s=3600)
        result = Cleaner(ws, store, Storage(root)).run_once(now=time.time() + 3601)
        out["sweep"] = {"expired": result.expired if result else None}
        out["after_retention"] = _du(root)
        record = store.get(job_id)
        out["record_kept"] = record is not None and record.expired_at is not None
        client.close()
    finally:
        if worker is not None:
            _stop(worker)
        _stop(api)
    return out


# ---------------------------------------------------------------------------- 2. cleaner
def _moto(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    with (work / "moto.log").open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/moto-api/", proc)
    return proc, url


def cleaner(redis_url: str, work: Path, n_jobs: int, endpoint: str | None) -> dict[str, Any]:
    import hashlib

    from worker.broker import redis_client
    from worker.jobs import JobRecord, JobState
    from worker.retention import Cleaner
    from worker.settings import WorkerSettings
    from worker.storage import open_storage
    from worker.store import JobStore
    from worker.usage import ByteKind, Ledger

    kwargs: dict[str, Any] = {"storage_dir": work / f"clean-{uuid.uuid4().hex[:6]}"}
    if endpoint:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        kwargs |= {"storage_url": f"s3://{bucket}/svc", "s3_endpoint_url": endpoint}
    settings = WorkerSettings(retention_s=60, **kwargs)
    storage = open_storage(settings)
    storage.ensure()
    client = redis_client(redis_url)
    store = JobStore(client, f"bench-{uuid.uuid4().hex[:8]}:")
    ledger = Ledger(store)
    files = {"model.onnx": b"o" * 8192, "model.ts": b"t" * 8192, "report.json": b"{}"}
    entries = [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in files.items()
    ]
    manifest = json.dumps({"files": entries})
    t0 = time.perf_counter()
    for i in range(n_jobs):
        job_id = uuid.uuid4().hex
        storage.uploads(job_id).mkdir(parents=True, exist_ok=True)
        sink = storage.open_upload(job_id, "weights.bin")
        sink.write(b"w" * 4096)
        sink.commit()
        storage.discard_staging(job_id)
        now = time.time()
        record = JobRecord.model_validate(
            {"id": job_id, "owner": "bench", "state": "queued", "config": CONFIG,
             "weights": sink.ref, "created_at": now, "updated_at": now}
        )  # fmt: skip
        ledger.create_job(record, max_jobs=0, max_bytes=0, upload_bytes=4096)
        store.start(job_id, max_redeliveries=2)
        if i % 4 == 3:  # some failed, uploads still there
            store.finish(job_id, JobState.failed)
            continue
        out = storage.fresh_scratch(job_id)
        out.mkdir()
        for name, data in files.items():
            (out / name).write_bytes(data)
        (out / "manifest.json").write_text(manifest)
        storage.publish(job_id)
        ledger.add(job_id, ByteKind.artifacts, storage.artifact_bytes(job_id))
        store.finish(job_id, JobState.succeeded)
    setup_s = time.perf_counter() - t0
    stored_before = ledger.stored_bytes("bench")
    result = Cleaner(settings, store, storage).run_once(now=time.time() + 61)
    assert result is not None and result.expired == n_jobs, result
    left = ledger.stored_bytes("bench")
    keys = list(client.scan_iter(match=f"{store.prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    return {
        "backend": "s3 (moto)" if endpoint else "local folder",
        "jobs": n_jobs,
        "setup_s": round(setup_s, 2),
        "sweep_s": round(result.seconds, 3),
        "per_job_ms": round(1000 * result.seconds / n_jobs, 2),
        "stored_bytes_before": stored_before,
        "stored_bytes_after": left,
    }


# ---------------------------------------------------------------------------- 3. quotas
def submissions(redis_url: str, work: Path, n: int) -> list[dict[str, Any]]:
    rows = []
    for label, quota in (("quotas off", {}), ("quotas on", {
        "FLOW_COMPRESS_QUOTA_JOBS": str(n + 100), "FLOW_COMPRESS_QUOTA_BYTES": str(10**12),
    })):  # fmt: skip
        root = work / f"quota-{uuid.uuid4().hex[:6]}"
        (root / "models").mkdir(parents=True)
        (root / "models" / "w.bin").write_bytes(b"w" * 4096)
        env = _env(
            FLOW_COMPRESS_REDIS_URL=redis_url,
            FLOW_COMPRESS_KEY_PREFIX=f"bench-{uuid.uuid4().hex[:8]}:",
            FLOW_COMPRESS_STORAGE_DIR=str(root),
            **quota,
        )
        api, url = _api(env, work / "quota-api.log")
        try:
            times = []
            with httpx.Client(base_url=url, timeout=30) as http:
                body = {"config": CONFIG, "weights_uri": "models/w.bin"}
                for _ in range(20):  # warm-up
                    http.post("/v1/jobs", json=body)
                for _ in range(n):
                    t = time.perf_counter()
                    r = http.post("/v1/jobs", json=body)
                    times.append(1000 * (time.perf_counter() - t))
                    assert r.status_code == 202, r.text
            rows.append(
                {"setting": label, "n": n, "p50_ms": round(percentile(times, 50), 2),
                 "p99_ms": round(percentile(times, 99), 2)}
            )  # fmt: skip
        finally:
            _stop(api)
    return rows


def insertion(redis_url: str, n: int = 1000) -> dict[str, float]:
    from worker.broker import redis_client
    from worker.jobs import JobRecord
    from worker.store import JobStore
    from worker.usage import Ledger

    client = redis_client(redis_url)
    store = JobStore(client, f"bench-{uuid.uuid4().hex[:8]}:")
    ledger = Ledger(store)

    def record() -> JobRecord:
        now = time.time()
        return JobRecord.model_validate(
            {"id": uuid.uuid4().hex, "owner": "bench", "state": "queued", "config": CONFIG,
             "weights": "/x", "created_at": now, "updated_at": now}
        )  # fmt: skip

    out = {}

    def checked() -> None:
        ledger.create_job(record(), max_jobs=10**9, max_bytes=10**15, upload_bytes=4096)

    for label, insert in (
        ("multi_exec_us", lambda: store.create(record())),
        ("quota_lua_us", checked),
    ):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            insert()
            times.append(1e6 * (time.perf_counter() - t))
        out[label] = round(percentile(times, 50), 1)
    keys = list(client.scan_iter(match=f"{store.prefix}*", count=1000))
    client.delete(*keys)
    client.close()
    return out


def render(results: dict[str, Any]) -> str:
    """RESULTS.md from results.json."""
    mb = 1e6
    lines = ["# Retention, quotas and storage (`python -m bench.storage`)", ""]
    env = results["machine"]
    lines += [
        f"Machine: {env.get('cpu')}, {env.get('cores')}, load {env.get('loadavg_1m_5m_15m')}.",
        "",
    ]
    if "footprint" in results:
        f = results["footprint"]
        rows = [
            (when, *(f"{f[key][part] / mb:.1f} MB" for part in ("uploads", "scratch", "artifacts")))
            for when, key in (
                ("queued", "queued"),
                ("succeeded", "succeeded"),
                ("after the retention sweep", "after_retention"),
            )
        ]
        lines += [
            "## What a tiny job leaves on disk (local folder)",
            "",
            f"resnet18 on digits at 16 px, {f['job_wall_s']} s; weights upload "
            f"{f['weights_bytes'] / mb:.1f} MB. The job record stays after the sweep: "
            f"{f['record_kept']}.",
            "",
            md_table(("when", "uploads/", "scratch/", "artifacts/"), rows),
            "",
        ]
    rows = [
        (c["backend"], c["jobs"], f"{c['sweep_s']:.2f} s", f"{c['per_job_ms']:.1f} ms",
         f"{c['stored_bytes_before']} → {c['stored_bytes_after']}")
        for c in results["cleaner"]
    ]  # fmt: skip
    lines += [
        "## One retention sweep over expired jobs",
        "",
        "Each job: a 4 KiB upload (kept on a quarter of them, as failed jobs) and three "
        "artifacts (17 KiB with the manifest).",
        "",
        md_table(("storage", "jobs", "sweep", "per job", "bytes counted"), rows),
        "",
        "## What the quota check adds to a submission",
        "",
        md_table(
            ("API setting", "submissions", "p50", "p99"),
            [
                (r["setting"], r["n"], f"{r['p50_ms']} ms", f"{r['p99_ms']} ms")
                for r in results["submissions"]
            ],
        ),
        "",
        f"The job insertion alone (in-process, p50 of 1000): MULTI/EXEC "
        f"{results['insertion']['multi_exec_us']} µs, the quota-checking Lua script "
        f"{results['insertion']['quota_lua_us']} µs.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--submissions", type=int, default=300)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "storage")
    args = parser.parse_args()

    from worker.broker import EmbeddedRedis

    work = Path(tempfile.mkdtemp(prefix="fc-bench-storage-"))
    redis = EmbeddedRedis(work / "redis")
    redis_url = redis.start()
    moto, endpoint = _moto(work)
    os.environ.update(CREDENTIALS)
    results: dict[str, Any] = {"machine": machine()}
    try:
        log("cleaner, local folder")
        results["cleaner"] = [cleaner(redis_url, work, args.jobs, None)]
        log("cleaner, S3")
        results["cleaner"].append(cleaner(redis_url, work, args.jobs, endpoint))
        log("insertion")
        results["insertion"] = insertion(redis_url)
        log("submissions")
        results["submissions"] = submissions(redis_url, work, args.submissions)
        if not args.skip_tiny:
            log("tiny job footprint")
            results["footprint"] = footprint(redis_url, work)
    finally:
        _stop(moto)
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out / "results.json", results)
    write_text(args.out / "RESULTS.md", render(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
