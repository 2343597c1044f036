"""The HTTP API in-process (FastAPI's TestClient) against a real Redis, without a worker:
validation, auth, limits, idempotency, cancel, artifacts and the queue message."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from tests.api.conftest import storage_of, store_of
from worker.broker import redis_client
from worker.jobs import JobState

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
CONFIG = {"model": "resnet18", "dataset": "digits", "target_macs": 0.5}
KEYS = ("key-alice", "key-bob")


def post_job(
    client: TestClient,
    config: dict[str, Any] | None = None,
    *,
    weights: bytes = b"weights",
    dataset: bytes | None = None,
    headers: dict[str, str] | None = None,
    **spec: Any,
) -> Any:
    files: dict[str, Any] = {
        "spec": (None, json.dumps({"config": config or CONFIG, **spec}), "application/json"),
        "weights": ("w.safetensors", weights, "application/octet-stream"),
    }
    if dataset is not None:
        files["dataset"] = ("ds.zip", dataset, "application/zip")
    return client.post("/v1/jobs", files=files, headers=headers or {})


def error_of(response: Any) -> dict[str, Any]:
    return response.json()["error"]  # type: ignore[no-any-return]


def uploads_left(client: TestClient) -> list[Path]:
    return list(storage_of(client).uploads_dir.iterdir())


def test_submit_stores_the_job_and_queues_it_under_its_id(client: TestClient) -> None:
    r = post_job(client)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["config"]["target_macs"] == 0.5
    assert job["weights_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"
    # The Celery message: task id = job id, payload = the job's config and weights path.
    store = store_of(client)
    raw = store.r.lrange(f"{store.prefix}celery:gpu", 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["id"] == job["id"]
    args, _, _ = json.loads(base64.b64decode(message["body"]))
    assert args[0]["job_id"] == job["id"] and args[0]["config"] == job["config"]
    assert Path(args[0]["weights"]).read_bytes() == b"weights"


def test_json_body_with_weights_on_the_server(make_client: Callable[..., TestClient]) -> None:
    client = make_client(shared_weights_dirs=["models"])
    models = storage_of(client).root / "models"
    models.mkdir()
    (models / "r18.safetensors").write_bytes(b"w" * 10)
    r = client.post("/v1/jobs", json={"config": CONFIG, "weights_uri": "models/r18.safetensors"})
    assert r.status_code == 202, r.text
    for refused in ("storage://models/nope", "../outside.bin", "/etc/passwd", "redis/jobs.rdb"):
        r = client.post("/v1/jobs", json={"config": CONFIG, "weights_uri": refused})
        assert r.status_code == 422 and error_of(r)["field"] == "weights_uri", refused
        assert error_of(r)["code"] == "weights_not_found", refused
    r = client.post("/v1/jobs", json={"config": CONFIG})
    assert r.status_code == 422 and error_of(r)["field"] == "weights_uri"


@pytest.mark.parametrize(
    ("config", "code", "field"),
    [
        ({**CONFIG, "model": "resnet19"}, "unsupported_model", "spec.config.model"),
        ({**CONFIG, "target_macs": 1.5}, "validation_error", "spec.config.target_macs"),
        ({**CONFIG, "target_macs": 0}, "validation_error", "spec.config.target_macs"),
        ({**CONFIG, "dataset": "mnistt"}, "invalid_dataset", "spec.config.dataset"),
        ({**CONFIG, "dataset": "imagefolder:/etc"}, "invalid_dataset", "spec.config.dataset"),
        ({**CONFIG, "dataset": "imagefolder:../.."}, "invalid_dataset", "spec.config.dataset"),
        ({**CONFIG, "dataset": "imagefolder:missing"}, "dataset_not_found", "spec.config.dataset"),
        ({**CONFIG, "num_classes": 7}, "validation_error", "spec.config.num_classes"),
        ({**CONFIG, "dataset": "upload"}, "validation_error", "spec.config.dataset"),
        ({**CONFIG, "prune": {"stepz": 3}}, "validation_error", "spec.config.prune.stepz"),
    ],
)
def test_invalid_specs_are_refused_with_the_field(
    client: TestClient, config: dict[str, Any], code: str, field: str
) -> None:
    r = post_job(client, config)
    assert r.status_code == 422, r.text
    assert (error_of(r)["code"], error_of(r)["field"]) == (code, field)
    assert uploads_left(client) == []
    assert client.get("/v1/jobs").json()["total"] == 0


def test_dataset_paths_resolve_inside_allowed_roots(client: TestClient, tmp_path: Path) -> None:
    (storage_of(client).datasets_dir / "mine").mkdir()
    (tmp_path / "allowed" / "shared").mkdir(parents=True)
    for ref, expected in (
        ("imagefolder:mine", storage_of(client).datasets_dir / "mine"),
        (f"imagefolder:{tmp_path}/allowed/shared", tmp_path / "allowed" / "shared"),
    ):
        r = post_job(client, {**CONFIG, "dataset": ref})
        assert r.status_code == 202, r.text
        # Clients see their own reference; the job reads the pinned, resolved path.
        assert r.json()["config"]["dataset"] == ref
        record = store_of(client).get(r.json()["id"])
        assert record is not None
        assert record.dataset_path == f"imagefolder:{expected.resolve()}"
        assert record.payload().library_config().dataset == record.dataset_path


def test_uploaded_archive_becomes_an_imagefolder_reference(client: TestClient) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for c in ("cat", "dog"):
            zf.writestr(f"pets/{c}/0.png", PNG)
    r = post_job(client, {**CONFIG, "dataset": "upload", "num_classes": 2}, dataset=buf.getvalue())
    assert r.status_code == 202, r.text
    job = r.json()
    root = storage_of(client).uploads(job["id"]) / "dataset" / "pets"
    assert job["config"]["dataset"] == "upload"  # no server path in the job view
    record = store_of(client).get(job["id"])
    assert record is not None and record.dataset_path == f"imagefolder:{root}"
    assert job["dataset_sha256"] == hashlib.sha256(buf.getvalue()).hexdigest()
    assert sorted(p.name for p in root.iterdir()) == ["cat", "dog"]


def test_malicious_archive_is_refused_and_leaves_nothing(client: TestClient) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/0.png", PNG)
        zf.writestr("../../../../escape.txt", b"pwned")
    r = post_job(client, {**CONFIG, "dataset": "upload"}, dataset=buf.getvalue())
    assert r.status_code == 422
    assert (error_of(r)["code"], error_of(r)["field"]) == ("invalid_archive", "dataset")
    assert uploads_left(client) == []
    assert not any(storage_of(client).root.parent.rglob("escape.txt"))


def test_oversize_upload_is_413_announced_or_streamed(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_upload_bytes=64 * 1024)
    r = post_job(client, weights=b"x" * (128 * 1024))
    assert r.status_code == 413 and error_of(r)["code"] == "payload_too_large"

    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n'
        f"{json.dumps({'config': CONFIG})}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: only counting can stop it
        yield head
        for _ in range(32):
            yield b"y" * 8192

    r = client.post(
        "/v1/jobs",
        content=chunked(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413 and error_of(r)["code"] == "payload_too_large"
    assert uploads_left(client) == []


def test_malformed_requests(client: TestClient) -> None:
    r = client.post("/v1/jobs", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type"
    r = client.post(
        "/v1/jobs",
        files={"spec": (None, json.dumps({"config": CONFIG})), "extra": ("x", b"1")},
    )
    assert r.status_code == 422 and error_of(r)["field"] == "extra"
    r = client.post("/v1/jobs", files={"weights": ("w", b"1")})
    assert r.status_code == 422 and error_of(r)["field"] == "spec"
    r = post_job(client, weights=b"")
    assert r.status_code == 422 and error_of(r)["code"] == "bad_checkpoint"
    r = client.post("/v1/jobs", files={"spec": (None, "{not json")})
    assert r.status_code == 422 and error_of(r)["field"] == "spec"


def test_unknown_job_is_404(client: TestClient) -> None:
    for path in ("/v1/jobs/" + "0" * 32, "/v1/jobs/../../etc", "/v1/jobs/nothex"):
        r = client.get(path)
        assert r.status_code == 404, path
    r = client.get("/v1/jobs/" + "0" * 32)
    assert error_of(r)["code"] == "not_found"
    assert client.delete("/v1/jobs/" + "0" * 32).status_code == 404
    assert client.get(f"/v1/jobs/{'0' * 32}/artifacts/model.onnx").status_code == 404


def test_api_keys_authenticate_and_isolate_owners(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(api_keys=",".join(KEYS))
    r = client.get("/v1/jobs")
    assert r.status_code == 401 and error_of(r)["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/jobs", headers={"X-API-Key": "key-alic"}).status_code == 401
    assert post_job(client).status_code == 401
    alice = {"Authorization": f"Bearer {KEYS[0]}"}
    bob = {"X-API-Key": KEYS[1]}
    job = post_job(client, headers=alice).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}", headers=bob).status_code == 404
    assert client.delete(f"/v1/jobs/{job['id']}", headers=bob).status_code == 404
    assert client.get("/v1/jobs", headers=bob).json()["total"] == 0
    assert client.get("/v1/jobs", headers=alice).json()["total"] == 1
    # Probes stay open; the documentation needs a key like the API it describes.
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    for page in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(page).status_code == 401, page
        assert client.get(page, headers=bob).status_code == 200, page


def test_idempotency_key_returns_the_same_job(client: TestClient) -> None:
    first = post_job(client, headers={"Idempotency-Key": "build-42"})
    again = post_job(client, headers={"Idempotency-Key": "build-42"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    # The key is bound to its request: other weights under the same key are refused.
    other_weights = post_job(client, weights=b"other", headers={"Idempotency-Key": "build-42"})
    assert other_weights.status_code == 422, other_weights.text
    assert error_of(other_weights)["code"] == "idempotency_key_reused"
    other = post_job(client, headers={"Idempotency-Key": "build-43"})
    assert other.json()["id"] != first.json()["id"]
    assert client.get("/v1/jobs").json()["total"] == 2
    assert len(uploads_left(client)) == 2


def test_list_pages_and_filters(client: TestClient) -> None:
    ids = [post_job(client).json()["id"] for _ in range(3)]
    client.delete(f"/v1/jobs/{ids[0]}")
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == [ids[2], ids[1]]
    page = client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert [j["id"] for j in page["items"]] == [ids[0]]
    cancelled = client.get("/v1/jobs", params={"state": "cancelled"}).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert client.get("/v1/jobs", params={"state": "bogus"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 1000}).status_code == 422


def test_cancel_queued_and_running_delete_finished(client: TestClient) -> None:
    store = store_of(client)
    queued = post_job(client).json()["id"]
    r = client.delete(f"/v1/jobs/{queued}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert not storage_of(client).uploads(queued).exists()
    assert client.delete(f"/v1/jobs/{queued}").status_code == 200  # idempotent

    running = post_job(client).json()["id"]
    store.start(running, max_redeliveries=2)
    r = client.delete(f"/v1/jobs/{running}")
    assert r.status_code == 202
    assert r.json()["state"] == "running" and r.json()["cancel_requested"] is True

    done = post_job(client).json()["id"]
    store.start(done, max_redeliveries=2)
    store.finish(done, JobState.succeeded)
    r = client.delete(f"/v1/jobs/{done}")  # a finished job: its files go, the record stays
    assert r.status_code == 200 and r.json()["state"] == "succeeded"
    assert r.json()["expired_reason"] == "deleted" and r.json()["expired_at"]
    r = client.get(f"/v1/jobs/{done}/report")
    assert r.status_code == 410 and error_of(r)["code"] == "artifacts_expired"


def test_report_and_artifacts_come_from_the_manifest_only(client: TestClient) -> None:
    job_id = post_job(client).json()["id"]
    for path in ("report", "artifacts", "artifacts/model.onnx"):
        r = client.get(f"/v1/jobs/{job_id}/{path}")
        assert r.status_code == 409 and error_of(r)["code"] == "artifacts_not_available"

    storage, store = storage_of(client), store_of(client)
    out = storage.fresh_scratch(job_id)
    out.mkdir()
    files = {"model.onnx": b"onnx-bytes", "report.json": b'{"schema_version": 1}'}
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / "secret.txt").write_bytes(b"not in the manifest")
    manifest = [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in files.items()
    ]
    (out / "manifest.json").write_text(json.dumps({"files": manifest}))
    storage.publish(job_id)
    store.start(job_id, max_redeliveries=2)
    store.finish(job_id, JobState.succeeded)

    listed = client.get(f"/v1/jobs/{job_id}/artifacts").json()["files"]
    assert [f["name"] for f in listed] == ["model.onnx", "report.json"]
    r = client.get(listed[0]["url"])
    assert r.status_code == 200 and r.content == b"onnx-bytes"
    assert r.headers["x-content-sha256"] == manifest[0]["sha256"]
    assert client.get(f"/v1/jobs/{job_id}/report").json() == {"schema_version": 1}
    for name in ("secret.txt", "manifest.json", "..%2F..%2Fredis%2Fjobs.rdb", "%2Fetc%2Fpasswd"):
        assert client.get(f"/v1/jobs/{job_id}/artifacts/{name}").status_code == 404, name


def test_job_view_reports_timestamps_and_progress(client: TestClient) -> None:
    job_id = post_job(client).json()["id"]
    store = store_of(client)
    store.start(job_id, max_redeliveries=2)
    store.progress(job_id, stage="Filter Prune", step=2, total_steps=8, percent=30.0, top1=91.5)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["state"], job["stage"], job["step"], job["total_steps"]) == (
        "running",
        "Filter Prune",
        2,
        8,
    )
    assert job["percent"] == 30.0 and job["top1"] == 91.5 and job["started_at"] is not None
    assert job["finished_at"] is None and job["error"] is None


def test_openapi_documents_the_routes_and_the_spec(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/report", "/healthz"} <= set(
        doc["paths"]
    )
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    schemas = doc["components"]["schemas"]
    assert "JobSpec" in schemas and "CompressionConfig" in schemas
    assert client.get("/docs").status_code == 200


def test_readyz_fails_when_redis_is_unreachable(tmp_path: Path) -> None:
    settings = ApiSettings(redis_url="redis://127.0.0.1:1/0", storage_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        r = client.get("/readyz")
        assert r.status_code == 503 and error_of(r)["code"] == "broker_unavailable"
        assert client.get("/v1/jobs").status_code == 503
        assert time.monotonic() - started < 30
        assert client.get("/healthz").status_code == 200


def test_api_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import api.app, api.cli, api.client, worker.tasks, worker.celery_app\n"
        "api.app.create_app\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_store_keys_live_under_the_prefix(client: TestClient, redis_url: str) -> None:
    post_job(client)
    prefix = store_of(client).prefix
    keys = list(redis_client(redis_url).scan_iter(match=f"{prefix}*"))
    assert keys and all(k.startswith(prefix) for k in keys)
