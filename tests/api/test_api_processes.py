"""``flow-compress serve --api-processes 2`` against its embedded Redis: both API processes
run under uvicorn's supervisor, every answer sees the one job store, /metrics adds up the
request counters of every process whichever process answers the scrape, and SIGTERM stops
the processes and the embedded Redis, and so does a kill -9 of serve.

The in-process tests (test_metrics.py) cover the metrics of one process; the app's startup
freezing what it built out of the collector's sight is checked here too (the cheap part)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.test_metrics import CONFIG, parse, value
from tests.api.test_service_e2e import REPO, _clean_env, _free_port
from tests.worker.support import children, stop

BOOT_TIMEOUT_S = 90
POLLS = 40


def _api_processes(pid: int) -> list[int]:
    found = []
    for kid in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{kid}/cmdline").read_bytes():
                found.append(kid)
        except OSError:
            continue
    return found


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    storage, log = tmp_path / "storage", tmp_path / "serve.log"
    port = _free_port()
    env = _clean_env() | {
        "FLOW_COMPRESS_STORAGE_DIR": str(storage),
        "FLOW_COMPRESS_SHARED_WEIGHTS_DIRS": "models",
    }
    cmd = [sys.executable, "-m", "api.cli", "serve", "--no-worker", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--api-processes", "2"], cwd=REPO, env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while len(_api_processes(proc.pid)) < 2 or not _ready(url):
            assert proc.poll() is None, f"serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"serve not ready:\n{log.read_text()}"
            time.sleep(0.3)
        yield proc, url, storage
    finally:
        stop(proc, grace_s=60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_two_api_processes_share_the_store_and_the_metrics(
    served: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    proc, url, storage = served
    api = _api_processes(proc.pid)
    assert len(api) == 2, api
    (storage / "models").mkdir(parents=True, exist_ok=True)
    (storage / "models" / "w.bin").write_bytes(b"weights")
    r = httpx.post(f"{url}/v1/jobs", json={"config": CONFIG, "weights_uri": "models/w.bin"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    # A new connection each time (httpx.get): the processes take turns accepting.
    for _ in range(POLLS):
        r = httpx.get(f"{url}/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["id"] == job_id, r.text
    for _ in range(6):
        r = httpx.get(f"{url}/metrics")
        assert r.status_code == 200, r.text
        m = parse(r.text)
        polls = value(
            m,
            "flow_compress_http_requests_total",
            method="GET",
            route="/v1/jobs/{job_id}",
            status="200",
        )
        assert polls == POLLS
        assert value(m, "flow_compress_jobs", state="queued") == 1
        # One process's own figures would pass for the service's: left out.
        assert not any(name.startswith("flow_compress_process_") for name in m)

    redis_kids = [k for k in children(proc.pid) if k not in api]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    for pid in api + redis_kids:
        for _ in range(50):
            if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"process {pid} outlived serve: {_describe(pid)}")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_startup_freezes_what_the_app_built_until_shutdown(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    assert gc.get_freeze_count() > 0
    client.__exit__(None, None, None)
    assert gc.get_freeze_count() == 0


def test_kill_9_of_serve_takes_its_api_processes_along(
    served: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    proc, _, _ = served
    family = children(proc.pid)
    assert len(family) >= 3, family  # two API processes and the embedded Redis
    proc.kill()
    proc.wait(timeout=10)
    for pid in family:
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"process {pid} outlived serve: {_describe(pid)}")


def _describe(pid: int) -> str:
    """What a process is and what it is doing, for a failure message."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError as exc:
        return f"unreadable ({exc})"
    keep = [line for line in status if line.split(":")[0] in ("State", "PPid", "SigCgt", "Threads")]
    return f"{cmd!r} {'; '.join(keep)}; wchan {wchan}"
