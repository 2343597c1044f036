"""Retention, quotas, usage and the owner's delete, against a real Redis, real storage (the
local folder and a real S3 server) and, where concurrency or the worker's timer matters, a
real API process and a real Celery worker."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.auth import owner_for_key
from tests.api.conftest import storage_of, store_of
from tests.api.test_api import PNG, error_of, post_job
from tests.worker.s3support import keys, s3_endpoint, s3_settings, s3_url
from tests.worker.support import (
    service_env,
    settings_env,
    start_api,
    start_worker,
    stop,
    wait_for,
)
from tests.worker.test_run_job import write_outputs
from worker.broker import redis_client
from worker.jobs import JobRecord, JobState
from worker.retention import Cleaner
from worker.settings import WorkerSettings
from worker.storage import Storage, open_storage
from worker.store import JobStore
from worker.usage import ByteKind, Ledger

__all__ = ["s3_endpoint", "s3_url"]

CONFIG = {"model": "resnet18", "dataset": "digits", "target_macs": 0.5}
KEY_A, KEY_B, ADMIN = "key-tenant-a", "key-tenant-b", "key-operator"


def _h(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


# ---------------------------------------------------------------------------- quotas
def test_the_job_quota_holds_under_concurrent_submissions(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Sixteen threads submit at once against a real API process (limit 3): exactly three
    jobs exist afterwards, every other answer is 429 quota_exceeded with Retry-After."""
    storage = tmp_path / "storage"
    (storage / "models").mkdir(parents=True)
    (storage / "models" / "w.safetensors").write_bytes(b"weights")
    env = service_env(
        **settings_env(redis_url, key_prefix, storage),
        FLOW_COMPRESS_SHARED_WEIGHTS_DIRS="models",
        FLOW_COMPRESS_QUOTA_JOBS="3",
        FLOW_COMPRESS_QUOTA_RETRY_AFTER_S="17",
        FLOW_COMPRESS_API_KEYS=f"{KEY_A},{KEY_B}",
    )
    proc, url = start_api(env, tmp_path / "api.log")
    try:
        body = {"config": CONFIG, "weights_uri": "models/w.safetensors"}
        barrier = threading.Barrier(16)
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def submit() -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                barrier.wait()
                r = http.post("/v1/jobs", json=body, headers=_h(KEY_A))
            with lock:
                answers.append(r)

        threads = [threading.Thread(target=submit) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [202] * 3 + [429] * 13, [r.text for r in answers]
        for r in answers:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "quota_exceeded"
                assert r.headers["retry-after"] == "17"
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/v1/jobs", headers=_h(KEY_A)).json()["total"] == 3
            usage = http.get("/v1/usage", headers=_h(KEY_A)).json()
            assert usage["usage"]["active_jobs"] == 3 and usage["usage"]["jobs"]["queued"] == 3
            assert usage["limits"]["max_active_jobs"] == 3 and usage["owners"] is None
            # The limit is per key: another key still submits; a finished job frees a slot.
            assert http.post("/v1/jobs", json=body, headers=_h(KEY_B)).status_code == 202
            first = http.get("/v1/jobs", headers=_h(KEY_A)).json()["items"][0]["id"]
            assert http.delete(f"/v1/jobs/{first}", headers=_h(KEY_A)).status_code == 200
            assert http.post("/v1/jobs", json=body, headers=_h(KEY_A)).status_code == 202
            assert http.post("/v1/jobs", json=body, headers=_h(KEY_A)).status_code == 429
    finally:
        stop(proc)


@pytest.fixture
def keyed(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_keys=f"{KEY_A},{KEY_B}", admin_keys=ADMIN, quota_bytes=100_000)


def test_the_bytes_quota_counts_uploads_and_gives_them_back(keyed: TestClient) -> None:
    first = post_job(keyed, weights=b"w" * 60_000, headers=_h(KEY_A))
    assert first.status_code == 202
    r = post_job(keyed, weights=b"w" * 60_000, headers=_h(KEY_A))
    assert r.status_code == 429 and error_of(r)["code"] == "quota_exceeded"
    assert r.headers["retry-after"] == "60"
    # Nothing of the refused upload is left, and it is not counted.
    assert [p.name for p in storage_of(keyed).uploads_dir.iterdir()] == [first.json()["id"]]
    assert keyed.get("/v1/usage", headers=_h(KEY_A)).json()["usage"]["stored_bytes"] == 60_000
    assert keyed.get("/v1/usage", headers=_h(KEY_B)).json()["usage"]["stored_bytes"] == 0
    # Cancelling the queued job removes its upload and gives the bytes back.
    assert keyed.delete(f"/v1/jobs/{first.json()['id']}", headers=_h(KEY_A)).status_code == 200
    assert keyed.get("/v1/usage", headers=_h(KEY_A)).json()["usage"]["stored_bytes"] == 0
    assert post_job(keyed, weights=b"w" * 60_000, headers=_h(KEY_A)).status_code == 202
    # Once the limit is reached, a submission is refused before its body is read.
    post_job(keyed, weights=b"w" * 40_000, headers=_h(KEY_A))
    r = post_job(keyed, weights=b"w" * 10, headers=_h(KEY_A))
    assert r.status_code == 429


def test_usage_for_a_key_and_for_the_operator(keyed: TestClient) -> None:
    for key in (KEY_A, KEY_A, KEY_B):
        assert post_job(keyed, weights=b"w" * 1000, headers=_h(key)).status_code == 202
    own = keyed.get("/v1/usage", headers=_h(KEY_A)).json()
    assert own["usage"]["owner"] == owner_for_key(KEY_A)
    assert own["usage"]["jobs"]["queued"] == 2 and own["usage"]["stored_bytes"] == 2000
    assert own["owners"] is None  # a tenant sees only itself
    admin = keyed.get("/v1/usage", headers=_h(ADMIN))
    assert admin.status_code == 200
    owners = {u["owner"]: u for u in admin.json()["owners"]}
    assert owners[owner_for_key(KEY_A)]["stored_bytes"] == 2000
    assert owners[owner_for_key(KEY_B)]["jobs"]["queued"] == 1
    for key in (KEY_A, KEY_B, ADMIN):
        assert key not in admin.text  # owner ids, never keys
    assert keyed.get("/v1/usage").status_code == 401


def _publish(store: JobStore, storage: Storage, job_id: str, extra: int = 50_000) -> None:
    """What a worker does on success: artifacts published, counted, the job succeeded."""
    store.start(job_id, max_redeliveries=2)
    write_outputs(storage.fresh_scratch(job_id), {"model.ts": b"t" * extra})
    storage.publish(job_id)
    Ledger(store).add(job_id, ByteKind.artifacts, storage.artifact_bytes(job_id))
    store.finish(job_id, JobState.succeeded)


def test_an_owner_deletes_a_finished_jobs_files(keyed: TestClient) -> None:
    store, storage = store_of(keyed), storage_of(keyed)
    job_id = post_job(keyed, weights=b"w" * 1000, headers=_h(KEY_A)).json()["id"]
    _publish(store, storage, job_id)
    stored = keyed.get("/v1/usage", headers=_h(KEY_A)).json()["usage"]["stored_bytes"]
    assert stored == 1000 + storage.artifact_bytes(job_id) > 50_000  # uploads still there
    assert keyed.get(f"/v1/jobs/{job_id}/artifacts/model.ts", headers=_h(KEY_A)).status_code == 200
    # Another key cannot delete it (404, as for an unknown job); the owner can.
    assert keyed.delete(f"/v1/jobs/{job_id}", headers=_h(KEY_B)).status_code == 404
    r = keyed.delete(f"/v1/jobs/{job_id}", headers=_h(KEY_A))
    assert r.status_code == 200
    job = r.json()
    assert job["state"] == "succeeded" and job["expired_reason"] == "deleted"
    assert job["expired_at"] and set(job["links"]) == {"self"}
    assert not storage.artifacts(job_id).exists() and not storage.uploads(job_id).exists()
    for path in ("report", "artifacts", "artifacts/model.ts"):
        r = keyed.get(f"/v1/jobs/{job_id}/{path}", headers=_h(KEY_A))
        assert r.status_code == 410 and error_of(r)["code"] == "artifacts_expired", path
    assert keyed.get(f"/v1/jobs/{job_id}", headers=_h(KEY_A)).json()["expired_reason"] == "deleted"
    assert keyed.get("/v1/usage", headers=_h(KEY_A)).json()["usage"]["stored_bytes"] == 0
    again = keyed.delete(f"/v1/jobs/{job_id}", headers=_h(KEY_A))
    assert again.status_code == 200 and again.json()["expired_at"] == job["expired_at"]


# ---------------------------------------------------------------------------- retention
@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Settings keyword arguments for each storage backend (S3: a real moto server)."""
    if request.param == "local":
        yield {"storage_dir": tmp_path / "storage"}
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        url = request.getfixturevalue("s3_url")
        yield s3_settings(endpoint, url, tmp_path / "worker-root")


@pytest.fixture
def store(redis_url: str, key_prefix: str) -> Iterator[JobStore]:
    client = redis_client(redis_url)
    yield JobStore(client, key_prefix)
    client.close()


def _job(store: JobStore, storage: Storage, owner: str, upload: int = 2000) -> str:
    job_id = uuid.uuid4().hex
    storage.uploads(job_id).mkdir(parents=True, exist_ok=True)
    sink = storage.open_upload(job_id, "weights.bin")
    sink.write(b"w" * upload)
    sink.commit()
    storage.discard_staging(job_id)
    now = time.time()
    record = JobRecord.model_validate(
        {
            "id": job_id,
            "owner": owner,
            "state": "queued",
            "config": CONFIG,
            "weights": sink.ref,
            "created_at": now,
            "updated_at": now,
        }
    )
    assert Ledger(store).create_job(record, max_jobs=0, max_bytes=0, upload_bytes=upload) is None
    return job_id


def test_the_cleaner_expires_finished_jobs_past_their_retention(
    backend: dict[str, Any], store: JobStore
) -> None:
    settings = WorkerSettings(retention_s=3600, retention_failed_s=60, **backend)
    storage = open_storage(settings)
    storage.ensure()
    ledger = Ledger(store)
    succeeded = [_job(store, storage, "o") for _ in range(3)]
    for job_id in succeeded:
        _publish(store, storage, job_id)
        storage.scratch(job_id).mkdir(parents=True)  # as a crashed run might leave it
    failed = _job(store, storage, "o")  # failed with its uploads still stored
    store.start(failed, max_redeliveries=2)
    store.finish(failed, JobState.failed)
    queued = _job(store, storage, "o")
    running = _job(store, storage, "o")
    store.start(running, max_redeliveries=2)
    before = ledger.stored_bytes("o")
    assert before > 3 * 50_000

    cleaner = Cleaner(settings, store, storage)
    now = time.time()
    # Nothing is due yet.
    assert cleaner.run_once(now=now).expired == 0  # type: ignore[union-attr]
    # Past the failed jobs' retention only.
    result = cleaner.run_once(now=now + 61)
    assert result is not None and result.expired == 1
    assert store.get(failed).expired_reason == "retention"  # type: ignore[union-attr]
    assert storage.upload_bytes(failed) == 0
    assert store.get(succeeded[0]).expired_at is None  # type: ignore[union-attr]
    # Past every retention: the succeeded jobs' artifacts, uploads and scratch go.
    result = cleaner.run_once(now=now + 3601)
    assert result is not None and result.expired == 3
    for job_id in succeeded:
        record = store.get(job_id)
        assert record is not None and record.state is JobState.succeeded
        assert record.expired_reason == "retention" and record.expired_at is not None
        assert storage.read_manifest(job_id) is None and storage.artifact_bytes(job_id) == 0
        assert storage.upload_bytes(job_id) == 0 and not storage.scratch(job_id).exists()
    # Unfinished jobs keep everything; only their uploads remain counted.
    assert ledger.stored_bytes("o") == 2 * 2000
    assert {store.get(j).expired_at for j in (queued, running)} == {None}  # type: ignore[union-attr]
    assert storage.upload_bytes(queued) == 2000 and storage.upload_bytes(running) == 2000
    if isinstance(backend.get("storage_url"), str):
        assert keys(backend["s3_endpoint_url"], backend["storage_url"], "artifacts/") == []
    # A sweep finds nothing left to do.
    assert cleaner.run_once(now=now + 7200).expired == 0  # type: ignore[union-attr]


def test_one_sweep_at_a_time(store: JobStore, tmp_path: Path) -> None:
    settings = WorkerSettings(storage_dir=tmp_path / "s", retention_s=1)
    storage = open_storage(settings)
    storage.ensure()
    job_id = _job(store, storage, "o")
    store.start(job_id, max_redeliveries=2)
    store.finish(job_id, JobState.failed)
    held = store.r.lock(f"{store.prefix}lock:retention", timeout=30)
    assert held.acquire(blocking=False)
    # Another worker's sweep is running: this one does nothing.
    assert Cleaner(settings, store, storage).run_once(now=time.time() + 10) is None
    assert store.get(job_id).expired_at is None  # type: ignore[union-attr]
    held.release()
    result = Cleaner(settings, store, storage).run_once(now=time.time() + 10)
    assert result is not None and result.expired == 1


def test_each_worker_sweeps_its_own_leftover_scratch(store: JobStore, tmp_path: Path) -> None:
    """Without any retention: a finished job's scratch left on this machine (its worker died,
    the job ended elsewhere) goes; a running job's stays."""
    settings = WorkerSettings(storage_dir=tmp_path / "s")
    storage = open_storage(settings)
    storage.ensure()
    ended, running = _job(store, storage, "o"), _job(store, storage, "o")
    for job_id in (ended, running):
        store.start(job_id, max_redeliveries=2)
        (storage.checkpoint(job_id)).mkdir(parents=True)
    store.finish(ended, JobState.failed)
    (storage.scratch_dir / "not-a-job").mkdir()
    cleaner = Cleaner(settings, store, storage)
    assert cleaner.run_once() is None  # no retention configured
    assert cleaner.sweep_local_scratch() == 1
    assert not storage.scratch(ended).exists() and storage.checkpoint(running).is_dir()
    assert (storage.scratch_dir / "not-a-job").is_dir()
    assert store.get(ended).expired_at is None  # type: ignore[union-attr]


def test_a_real_worker_sweeps_on_its_timer(
    redis_url: str, key_prefix: str, store: JobStore, tmp_path: Path
) -> None:
    """A Celery worker started with a 1 s retention and a 0.5 s sweep interval expires a
    finished job by itself (time driven through the settings)."""
    root = tmp_path / "storage"
    storage = Storage(root)
    storage.ensure()
    job_id = _job(store, storage, "o")
    _publish(store, storage, job_id)
    env = service_env(
        **settings_env(redis_url, key_prefix, root),
        FLOW_COMPRESS_RETENTION_S="1",
        FLOW_COMPRESS_CLEANER_INTERVAL_S="0.5",
        FLOW_COMPRESS_QUEUE=f"q-{uuid.uuid4().hex[:8]}",
    )
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        wait_for(
            lambda: (
                (store.get(job_id).expired_at is not None)  # type: ignore[union-attr]
                and not storage.artifacts(job_id).exists()
            ),
            60,
            lambda: (tmp_path / "worker.log").read_text()[-3000:],
        )
    finally:
        stop(worker)
    assert Ledger(store).stored_bytes("o") == 0


# ---------------------------------------------------------------------------- S3 via the API
def test_the_api_streams_uploads_into_s3_and_a_refused_one_leaves_nothing(
    make_client: Callable[..., TestClient], s3_endpoint: str, s3_url: str, tmp_path: Path
) -> None:
    settings = s3_settings(s3_endpoint, s3_url, tmp_path / "api-root")
    settings.pop("storage_dir")
    client = make_client(**settings, max_upload_bytes=12 * 1024**2)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for cls in ("cat", "dog"):
            for i in range(2):
                zf.writestr(f"pets/{cls}/{i}.png", PNG)
    weights = b"w" * (7 * 1024**2)  # more than one 5 MiB part
    r = post_job(
        client,
        {"model": "resnet18", "dataset": "upload"},
        weights=weights,
        dataset=archive.getvalue(),
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    stored = keys(s3_endpoint, s3_url)
    assert f"uploads/{job_id}/weights.bin" in stored
    assert f"uploads/{job_id}/dataset/pets/cat/0.png" in stored
    assert not any("dataset.archive" in k for k in stored)
    assert not (tmp_path / "api-root" / "uploads" / job_id).exists()  # staging removed
    usage = client.get("/v1/usage").json()["usage"]
    assert usage["stored_bytes"] == len(weights) + 4 * len(PNG)
    payload = store_of(client).get(job_id).payload()  # type: ignore[union-attr]
    assert payload.weights == f"{s3_url}/uploads/{job_id}/weights.bin"
    assert payload.config.dataset == "upload"  # clients see their own reference
    worker_reads = payload.dataset_path or ""
    assert worker_reads.startswith(f"imagefolder:{s3_url}/uploads/{job_id}/dataset/")

    # Past the cap while streaming: 413, and no object or pending multipart upload remains.
    r = post_job(client, weights=b"w" * (13 * 1024**2))
    assert r.status_code == 413
    assert keys(s3_endpoint, s3_url) == stored
    # weights_uri names an object under the prefix, never another job's upload.
    r = client.post(
        "/v1/jobs",
        json={"config": CONFIG, "weights_uri": f"uploads/{job_id}/weights.bin"},
    )
    assert r.status_code == 422 and error_of(r)["field"] == "weights_uri"
    assert client.get("/readyz").json()["checks"] == {"broker": "ok", "storage": "ok"}
    assert json.loads(client.get(f"/v1/jobs/{job_id}").text)["state"] == "queued"
