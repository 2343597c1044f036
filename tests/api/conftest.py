"""Fixtures of the API tests: a real Redis (see tests/worker/support.py) and in-process apps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from tests.worker.support import key_prefix, redis_url
from worker.storage import Storage
from worker.store import JobStore

__all__ = ["key_prefix", "redis_url"]


@pytest.fixture
def make_client(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        # Tests name server-side weights under storage/models (weights_uri): share that folder.
        overrides.setdefault("shared_weights_dirs", ["models"])
        settings = ApiSettings(
            redis_url=redis_url,
            key_prefix=key_prefix,
            storage_dir=tmp_path / "storage",
            dataset_roots=[tmp_path / "allowed"],
            **overrides,
        )
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def storage_of(client: TestClient) -> Storage:
    return client.app.state.storage  # type: ignore[attr-defined,no-any-return]


def store_of(client: TestClient) -> JobStore:
    return client.app.state.store  # type: ignore[attr-defined,no-any-return]
