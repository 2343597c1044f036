"""Attacks and careless clients against a real service (uvicorn on loopback, real Redis,
real processes), for what an in-process client cannot show: concurrent requests racing on
one Idempotency-Key, requests naming a big server-side file, uploads held open, trickled or
aborted, a frozen Redis (SIGSTOP), and ``kill -9`` of ``flow-compress serve``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.worker.support import (
    REPO,
    children,
    free_port,
    service_env,
    settings_env,
    start_api,
    stop,
    wait_for,
)
from tests.worker.test_resilience import RedisServer, api, external_redis

__all__ = ["external_redis"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CONFIG: dict[str, Any] = {"model": "resnet18", "dataset": "digits", "target_macs": 0.5}
TRIALS = 40
CLIENTS = 16


@pytest.fixture
def service(redis_url: str, key_prefix: str, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A real API (no worker) with a shared weights folder and short upload timeouts;
    yields its URL, storage folder and log."""
    storage, log = tmp_path / "storage", tmp_path / "api.log"
    (storage / "models").mkdir(parents=True)
    (storage / "models" / "w.safetensors").write_bytes(b"weights")
    env = service_env(
        **settings_env(redis_url, key_prefix, storage),
        FLOW_COMPRESS_SHARED_WEIGHTS_DIRS="models",
        FLOW_COMPRESS_UPLOAD_IDLE_TIMEOUT_S="1",
        FLOW_COMPRESS_UPLOAD_MIN_BYTES_PER_S="100000",
    )
    proc, url = start_api(env, log, log_level="info")
    try:
        yield url, storage, log
    finally:
        stop(proc)


def test_concurrent_requests_with_one_idempotency_key_make_one_job(
    service: tuple[str, Path, Path],
) -> None:
    """16 clients behind a barrier send the same request with the same key, 40 times: every
    trial makes exactly one job and every client gets its id. (Before the claim and the
    creation were one transaction, a trial now and then made several jobs.)"""
    url, _, _ = service
    body = {"config": CONFIG, "weights_uri": "models/w.safetensors"}
    bad_trials: list[tuple[int, set[str]]] = []
    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as http:
        for trial in range(TRIALS):
            key = f"race-{trial}-{uuid.uuid4().hex[:8]}"
            barrier = threading.Barrier(CLIENTS)
            answers: list[httpx.Response] = []

            def post(
                key: str = key,
                barrier: threading.Barrier = barrier,
                answers: list[httpx.Response] = answers,
            ) -> None:
                barrier.wait()
                answers.append(http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}))

            threads = [threading.Thread(target=post) for _ in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert all(r.status_code == 202 for r in answers), [r.text for r in answers]
            ids = {r.json()["id"] for r in answers}
            replayed = sum(r.headers.get("idempotent-replayed") == "true" for r in answers)
            if len(ids) != 1 or replayed != CLIENTS - 1:
                bad_trials.append((trial, ids))
        total = http.get("/v1/jobs").json()["total"]
        # The same key with another request is refused, not silently replayed.
        other = http.post(
            "/v1/jobs",
            json={"config": {**CONFIG, "target_macs": 0.6}, "weights_uri": "models/w.safetensors"},
            headers={"Idempotency-Key": key},
        )
    print(f"idempotency race: {len(bad_trials)} of {TRIALS} trials made more than one job")
    assert bad_trials == [], bad_trials
    assert total == TRIALS
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


def _rchar(pid: int) -> int:
    """Bytes the process has read through read(2) and friends (page cache included)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


BIG = 256 << 20
CONCURRENT = 45


def test_requests_naming_a_big_server_file_hash_it_once_off_the_event_loop(
    service: tuple[str, Path, Path],
) -> None:
    url, storage, _ = service
    big = storage / "models" / "big.safetensors"
    with big.open("wb") as fh:
        fh.truncate(BIG)  # sparse: costs no disk, reads (and hashes) like 256 MiB
    api_pid = _api_pid(url)
    before = _rchar(api_pid)
    body = {"config": CONFIG, "weights_uri": "models/big.safetensors"}
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        submissions = [
            threading.Thread(target=lambda: http.post("/v1/jobs", json=body))
            for _ in range(CONCURRENT)
        ]
        for t in submissions:
            t.start()
        while any(t.is_alive() for t in submissions):
            t0 = time.monotonic()
            assert http.get("/v1/jobs", params={"limit": 1}).status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
        for t in submissions:
            t.join()
        assert http.get("/v1/jobs").json()["total"] == CONCURRENT
    read = _rchar(api_pid) - before
    print(
        f"{CONCURRENT} submissions naming a {BIG >> 20} MiB file: API read {read >> 20} MiB; "
        f"GET /v1/jobs meanwhile: max {max(latencies) * 1000:.0f} ms over {len(latencies)} polls"
    )
    assert read < 2 * BIG, read  # hashed once, not once per request
    assert max(latencies) < 3.0, latencies


def _api_pid(url: str) -> int:
    """The pid of the uvicorn process listening on ``url``'s port."""
    port = int(url.rsplit(":", 1)[1])
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
                inode = fields[9]
    assert inode is not None
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd) == f"socket:[{inode}]":
                return int(fd.parts[2])
    raise AssertionError("no process owns the port")


def _open_upload(url: str, first_bytes: bytes) -> socket.socket:
    """A multipart POST announcing 10 MB, of which only ``first_bytes`` are sent."""
    port = int(url.rsplit(":", 1)[1])
    boundary = "b" + uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n'
        f"{json.dumps({'config': CONFIG})}\r\n--{boundary}\r\n"
        'Content-Disposition: form-data; name="weights"; filename="w"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        (
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: {10_000_000}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
        ).encode()
        + head
        + first_bytes
    )
    return sock


def _answer(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_stalled_trickled_and_aborted_uploads_end_quickly_and_quietly(
    service: tuple[str, Path, Path],
) -> None:
    url, storage, log = service
    # Stalled: a 408 in the API's error shape once nothing came for the idle timeout (1 s).
    stalled = _open_upload(url, b"x" * 1000)
    t0 = time.monotonic()
    answer = _answer(stalled, 10)
    stalled_s = time.monotonic() - t0
    stalled.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b'"code":"request_timeout"' in answer and stalled_s < 5, (stalled_s, answer[:300])

    # Trickled: a byte now and then, well under the minimum rate, is cut off too.
    trickle = _open_upload(url, b"x")
    t0 = time.monotonic()
    trickled = b""
    with contextlib.suppress(OSError):
        while time.monotonic() - t0 < 10 and not trickled:
            trickle.sendall(b"x")
            time.sleep(0.2)
            trickle.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                trickled = trickle.recv(65536)
            trickle.setblocking(True)
    trickle.close()
    assert trickled.startswith(b"HTTP/1.1 408"), trickled[:300]
    assert time.monotonic() - t0 < 8

    # Aborted by the client: one INFO line, no traceback, nothing left on disk.
    aborted = _open_upload(url, b"x" * 5000)
    time.sleep(0.3)
    aborted.close()
    wait_for(
        lambda: "client disconnected during POST /v1/jobs" in log.read_text(), 10, log.read_text
    )
    text = log.read_text()
    assert "Traceback" not in text and "unhandled error" not in text, text[-3000:]
    wait_for(lambda: list((storage / "uploads").iterdir()) == [], 10)

    # Every answer carries the security headers, and no server banner.
    r = httpx.get(f"{url}/v1/jobs")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    assert "server" not in r.headers
    print(f"stalled upload refused after {stalled_s:.2f} s")


def test_a_frozen_redis_answers_503_within_about_a_second(
    external_redis: RedisServer, tmp_path: Path
) -> None:
    client = api(external_redis.url, tmp_path / "storage", "fc-frozen:")
    try:
        r = client.post(
            "/v1/jobs",
            files={"spec": (None, json.dumps({"config": CONFIG})), "weights": ("w", b"w")},
        )
        job_id = r.json()["id"]
        assert external_redis.proc is not None
        os.kill(external_redis.proc.pid, signal.SIGSTOP)
        try:
            timings = {}
            for path in (f"/v1/jobs/{job_id}", "/v1/jobs", "/readyz"):
                t0 = time.monotonic()
                r = client.get(path)
                timings[path] = time.monotonic() - t0
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "broker_unavailable"
                assert "redis://" not in r.text and "127.0.0.1" not in r.text
        finally:
            os.kill(external_redis.proc.pid, signal.SIGCONT)
        print("503 with a frozen Redis: " + ", ".join(f"{p} {s:.2f} s" for p, s in timings.items()))
        assert max(timings.values()) < 2.5, timings
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # back by itself
    finally:
        client.__exit__(None, None, None)


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only unreaped


def _serve(storage: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_COMPRESS_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "FLOW_COMPRESS_STORAGE_DIR": str(storage),
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        return False

    wait_for(ready, 120, lambda: log.read_text()[-3000:])
    return proc, url


def test_kill_9_of_serve_takes_its_worker_and_redis_along_and_a_restart_resumes_the_job(
    tmp_path: Path,
) -> None:
    storage, log = tmp_path / "storage", tmp_path / "serve.log"
    proc, url = _serve(storage, log)
    try:
        # A job caught running (bad weights: it fails soon after it starts, cheaply).
        r = httpx.post(
            f"{url}/v1/jobs",
            files={"spec": (None, json.dumps({"config": CONFIG})), "weights": ("w", b"w")},
        )
        job_id = r.json()["id"]
        wait_for(
            lambda: httpx.get(f"{url}/v1/jobs/{job_id}").json()["state"] == "running",
            120,
            lambda: log.read_text()[-3000:],
        )
        family = _descendants(proc.pid)
        assert len(family) >= 3, family  # worker, its pool child, redis-server
        proc.kill()
        proc.wait(10)
        wait_for(lambda: not any(_alive(p) for p in family), 15, lambda: str(family))
    finally:
        if proc.poll() is None:
            proc.kill()
    # The restarted service finds the job its dead worker held and runs it again at once.
    proc, url = _serve(storage, log)
    try:

        def ended() -> bool:
            return httpx.get(f"{url}/v1/jobs/{job_id}").json()["state"] == "failed"

        wait_for(ended, 180, lambda: log.read_text()[-3000:])
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        assert job["error"]["code"] == "bad_checkpoint" and job["attempts"] == 2, job
        assert f"job {job_id}: its worker died with the service" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_key_cannot_compress_another_keys_upload_with_two_workers_running(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Round one's attack, replayed against a real service with two workers: Bob names
    Alice's queued upload as his weights. Refused, exactly as a job that never existed is;
    Alice may reuse her own upload, and both her jobs run on the two workers."""
    from flow_compress.arch.models import build_model, save_weights
    from tests.api.test_load import JOB
    from tests.worker.support import start_worker

    storage, log = tmp_path / "storage", tmp_path / "api.log"
    weights = tmp_path / "w.safetensors"
    save_weights(build_model("resnet18", 10, input_size=16), weights)
    env = service_env(
        **settings_env(redis_url, key_prefix, storage), FLOW_COMPRESS_API_KEYS="key-a,key-b"
    )
    workers = [start_worker(env, tmp_path / f"worker{i}.log") for i in range(2)]
    proc, url = start_api(env, log)
    alice, bob = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post(
                "/v1/jobs",
                files={
                    "spec": (None, json.dumps({"config": JOB})),
                    "weights": ("w", weights.read_bytes()),
                },
                headers=alice,
            )
            assert r.status_code == 202, r.text
            first = r.json()["id"]

            def as_bob(uri: str) -> httpx.Response:
                return http.post("/v1/jobs", json={"config": JOB, "weights_uri": uri}, headers=bob)

            ghost = uuid.uuid4().hex
            theft = as_bob(f"uploads/{first}/weights.bin")
            assert theft.status_code == 422, theft.text
            assert theft.text == as_bob(f"uploads/{ghost}/weights.bin").text
            assert theft.json()["error"]["code"] == "weights_not_found"
            oracle = as_bob(f"artifacts/{first}/report.json")
            assert oracle.text == as_bob(f"artifacts/{ghost}/report.json").text == theft.text

            second = http.post(
                "/v1/jobs",
                json={"config": JOB, "weights_uri": f"uploads/{first}/weights.bin"},
                headers=alice,
            )
            assert second.status_code == 202, second.text
            jobs = [first, second.json()["id"]]

            def done() -> bool:
                states = [http.get(f"/v1/jobs/{j}", headers=alice).json()["state"] for j in jobs]
                return all(s in ("succeeded", "failed", "cancelled") for s in states)

            wait_for(done, 400, lambda: (tmp_path / "worker0.log").read_text()[-3000:])
            for job_id in jobs:
                job = http.get(f"/v1/jobs/{job_id}", headers=alice).json()
                assert job["state"] == "succeeded", job
                assert http.get(f"/v1/jobs/{job_id}/report", headers=bob).status_code == 404
            assert http.get("/v1/jobs", headers=bob).json()["total"] == 0
            ran_on = {
                i for i in range(2) if "succeeded" in (tmp_path / f"worker{i}.log").read_text()
            }
            assert ran_on == {0, 1}, "both workers ran one of Alice's jobs"
    finally:
        stop(proc)
        for w in workers:
            stop(w)
