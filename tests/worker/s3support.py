"""A real S3-compatible server for the tests: moto's standalone server in its own process on a
free loopback port (one per test session), and a fresh bucket per test."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.worker.support import free_port, stop, wait_for

# moto accepts any credentials; the service reads these as boto3 does (or FLOW_COMPRESS_S3_*).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-key-id",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/moto-api/", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 60, lambda: log.read_text()[-3000:])
    yield url
    stop(proc)


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """``s3://<fresh bucket>/svc``: each test has its own bucket."""
    bucket = f"fc-test-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/svc"


def s3_settings(endpoint: str, url: str, root: Path) -> dict[str, Any]:
    """WorkerSettings/ApiSettings keyword arguments for the S3 backend (explicit settings)."""
    return {
        "storage_dir": root,
        "storage_url": url,
        "s3_endpoint_url": endpoint,
        "s3_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "s3_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "s3_region": CREDENTIALS["AWS_DEFAULT_REGION"],
        "s3_part_size": 5 * 1024**2,
    }


def keys(endpoint: str, url: str, under: str = "") -> list[str]:
    """Object keys below ``url``'s prefix (``under`` appended), relative to the prefix."""
    bucket, _, prefix = url[5:].partition("/")
    client = s3_client(endpoint)
    found: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/{under}"
    ):
        found += [o["Key"][len(prefix) + 1 :] for o in page.get("Contents", [])]
    return sorted(found)
