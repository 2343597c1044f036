"""Owners are isolated (API keys on): another key's job does not exist for you — 404, never
403, on every route, succeeded jobs and their files included — and artifact names cannot
leave the job's folder (``..``, absolute, percent-encoded, symlinks)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

from fastapi.testclient import TestClient

from tests.api.conftest import storage_of, store_of
from worker.jobs import JobState

CONFIG = {"model": "resnet18", "dataset": "digits", "target_macs": 0.5}
ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"X-API-Key": "key-bob"}


def _succeeded_job(client: TestClient, headers: dict[str, str], files: dict[str, bytes]) -> str:
    r = client.post(
        "/v1/jobs",
        files={"spec": (None, json.dumps({"config": CONFIG})), "weights": ("w", b"w")},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    job_id = str(r.json()["id"])
    storage, store = storage_of(client), store_of(client)
    out = storage.fresh_scratch(job_id)
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    manifest = [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in files.items()
    ]
    (out / "manifest.json").write_text(json.dumps({"files": manifest}))
    storage.publish(job_id)
    store.start(job_id, max_redeliveries=2)
    store.finish(job_id, JobState.succeeded)
    return job_id


def test_another_keys_jobs_are_404_on_every_route(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys="key-alice,key-bob")
    job_id = _succeeded_job(client, ALICE, {"model.onnx": b"onnx", "report.json": b"{}"})
    queued = client.post(
        "/v1/jobs",
        files={"spec": (None, json.dumps({"config": CONFIG})), "weights": ("w", b"w")},
        headers=ALICE,
    ).json()["id"]
    routes = [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/report"),
        ("GET", f"/v1/jobs/{job_id}/artifacts"),
        ("GET", f"/v1/jobs/{job_id}/artifacts/model.onnx"),
        ("DELETE", f"/v1/jobs/{job_id}"),
        ("DELETE", f"/v1/jobs/{queued}"),
        ("GET", f"/v1/jobs/{queued}/report"),
    ]
    for method, path in routes:
        if method == "GET":  # the owner sees it (409: a queued job has no report yet)
            assert client.request(method, path, headers=ALICE).status_code in (200, 409), path
        r = client.request(method, path, headers=BOB)
        # Exactly what an id that never existed answers: nothing to tell the two apart.
        ghost = client.request(method, path.replace(job_id, "0" * 32).replace(queued, "1" * 32),
                               headers=BOB)  # fmt: skip
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        assert ghost.status_code == 404 and ghost.json()["error"]["code"] == "not_found"
    assert client.get("/v1/jobs/" + queued, headers=ALICE).json()["state"] == "queued"
    for params in ({}, {"state": "succeeded"}, {"state": "queued"}):
        assert client.get("/v1/jobs", params=params, headers=BOB).json()["total"] == 0
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 2
    # Both credentials at once must agree; a bad one is never masked by a good one.
    mixed = {**ALICE, **BOB}
    assert client.get(f"/v1/jobs/{job_id}", headers=mixed).status_code == 401
    assert client.get("/v1/jobs", headers={**BOB, "Authorization": "Basic eDp5"}).status_code == 401


def test_artifact_names_cannot_leave_the_job_folder(client: TestClient, tmp_path: str) -> None:
    storage = storage_of(client)
    secret = storage.root / "secret.txt"
    secret.write_text("not an artifact")
    job_id = _succeeded_job(client, {}, {"model.onnx": b"onnx", "report.json": b"{}"})
    # A link planted in the published folder under a name the manifest lists.
    folder = storage.artifacts(job_id)
    (folder / "model.onnx").unlink()
    os.symlink(secret, folder / "model.onnx")
    names = [
        "model.onnx",  # the planted link
        "..%2F..%2Fsecret.txt",
        "%2E%2E%2F%2E%2E%2Fsecret.txt",
        "%252e%252e%252fsecret.txt",
        "..%5C..%5Csecret.txt",
        "%2Fetc%2Fpasswd",
        "manifest.json",
        "report.json%00.png",
    ]
    for name in names:
        r = client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert r.status_code == 404, name
        assert b"not an artifact" not in r.content
    assert client.get(f"/v1/jobs/{job_id}/artifacts/report.json").status_code == 200
