"""The CI client's pieces that need no worker: building the spec from flags, and verified
downloads (run against the in-process app through httpx's transport)."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import uvicorn
from fastapi.testclient import TestClient

from api.cli import build_spec
from api.client import ApiClientError, Client
from tests.api.conftest import storage_of, store_of
from worker.jobs import JobRecord, JobState

FILES = {"model.onnx": b"onnx-bytes" * 100, "report.json": b"{}"}


def test_build_spec_merges_file_flags_and_overrides(tmp_path: Path) -> None:
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"model": "vgg11_bn", "recovery": {"lr": 0.1}}))
    spec = build_spec(
        model="resnet18",
        dataset="digits",
        config_file=config_file,
        sets=["recovery.final_iters=7", "prune.schedule=paper", 'export.formats=["onnx"]'],
        fields={"target_macs": 0.4, "max_drop": None},
        weights_uri="models/w.safetensors",
    )
    assert spec == {
        "config": {
            "model": "resnet18",
            "dataset": "digits",
            "target_macs": 0.4,
            "recovery": {"lr": 0.1, "final_iters": 7},
            "prune": {"schedule": "paper"},
            "export": {"formats": ["onnx"]},
        },
        "weights_uri": "models/w.safetensors",
    }
    for bad in (["recovery.final_iters=-1"], ["no-equals-sign"], ["model.name=x"]):
        with pytest.raises(typer.BadParameter):
            build_spec(
                model="resnet18",
                dataset="digits",
                config_file=None,
                sets=bad,
                fields={},
                weights_uri=None,
            )


def published_job(client: TestClient) -> str:
    """A succeeded job whose artifacts were published through the storage layer."""
    storage, store = storage_of(client), store_of(client)
    record = JobRecord.model_validate(
        {
            "id": "ab" * 16,
            "owner": "public",
            "state": "queued",
            "config": {"model": "resnet18", "dataset": "digits"},
            "created_at": time.time(),
            "updated_at": time.time(),
        }
    )
    store.create(record)
    out = storage.fresh_scratch(record.id)
    out.mkdir()
    for name, data in FILES.items():
        (out / name).write_bytes(data)
    manifest = [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in FILES.items()
    ]
    (out / "manifest.json").write_text(json.dumps({"files": manifest}))
    storage.publish(record.id)
    store.start(record.id, max_redeliveries=2)
    store.finish(record.id, JobState.succeeded)
    return record.id


@pytest.fixture
def server_url(client: TestClient) -> Iterator[str]:
    """The app behind a real uvicorn server on a free port (the client speaks real HTTP)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(client.app, host="127.0.0.1", port=port, lifespan="off", log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_download_verifies_every_file_against_the_manifest(
    client: TestClient, server_url: str, tmp_path: Path
) -> None:
    job_id = published_job(client)
    with Client(server_url) as api:
        written = api.download(job_id, tmp_path / "all")
        assert {p.name: p.read_bytes() for p in written} == FILES
        only = api.download(job_id, tmp_path / "one", ["report.json"])
        assert [p.name for p in only] == ["report.json"]
        with pytest.raises(ApiClientError) as err:
            api.download(job_id, tmp_path / "x", ["nope.bin"])
        assert err.value.code == "not_found"

        # A file altered on the server after publication no longer matches its manifest.
        (storage_of(client).artifacts(job_id) / "model.onnx").write_bytes(b"tampered!!" * 100)
        with pytest.raises(ApiClientError) as err:
            api.download(job_id, tmp_path / "bad")
        assert err.value.code == "checksum_mismatch"
        assert not list((tmp_path / "bad").glob("model.onnx*"))  # no partial file left


def test_client_errors_carry_the_server_code(server_url: str) -> None:
    with Client(server_url) as api:
        with pytest.raises(ApiClientError) as err:
            api.job("0" * 32)
        assert (err.value.code, err.value.status) == ("not_found", 404)
        with pytest.raises(ApiClientError) as err:
            api.submit({"config": {"model": "resnet18", "dataset": "digits", "target_macs": 2}})
        assert err.value.code == "validation_error" and "config.target_macs" in err.value.message
    with Client("http://127.0.0.1:1") as unreachable, pytest.raises(ApiClientError) as err:
        unreachable.job("0" * 32)
    assert err.value.code == "connection_failed"
