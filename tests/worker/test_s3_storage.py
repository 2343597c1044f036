"""The S3 storage backend against a real S3-compatible server (moto's, in its own process):
streamed uploads (single PUT and multipart, aborted without a trace), publication with the
manifest last (a publish killed part-way leaves no manifest), ranged reads, inputs staged on
a worker that shares nothing but the bucket, and ``run_job`` end to end on it with the usage
ledger counting and giving back the bytes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flow_compress.config import CompressionConfig
from flow_compress.schema import CompressionReport, ProgressEvent
from tests.worker.s3support import keys, s3_client, s3_endpoint, s3_settings, s3_url
from tests.worker.support import REPO
from tests.worker.test_run_job import make_report, write_outputs
from worker.broker import redis_client
from worker.jobs import JobPayload, JobRecord, JobState
from worker.s3 import S3Storage
from worker.settings import WorkerSettings
from worker.storage import MANIFEST, open_storage
from worker.store import JobStore
from worker.tasks import run_job
from worker.usage import Ledger

__all__ = ["s3_endpoint", "s3_url"]


@pytest.fixture
def make_storage(s3_endpoint: str, s3_url: str, tmp_path: Path) -> Callable[[str], S3Storage]:
    """An S3Storage with its own local root (``name``): API and worker share only the bucket."""

    def make(name: str) -> S3Storage:
        settings = WorkerSettings(**s3_settings(s3_endpoint, s3_url, tmp_path / name))
        storage = open_storage(settings)
        assert isinstance(storage, S3Storage)
        storage.ensure()
        return storage

    return make


def _job_id() -> str:
    return uuid.uuid4().hex


def _publishable(storage: S3Storage, job_id: str, files: dict[str, bytes]) -> dict[str, str]:
    out = storage.fresh_scratch(job_id)
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    manifest = {
        "files": [
            {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for n, d in files.items()
        ]
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    return {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}


def test_uploads_stream_in_parts_and_an_aborted_one_leaves_nothing(
    make_storage: Callable[[str], S3Storage], s3_endpoint: str, s3_url: str
) -> None:
    storage = make_storage("api")
    job_id = _job_id()
    big = os.urandom(storage.part_size * 2 + 12345)  # three parts: a real multipart upload
    sink = storage.open_upload(job_id, "weights.bin")
    for start in range(0, len(big), 1 << 20):
        sink.write(big[start : start + (1 << 20)])
    sink.commit()
    small = storage.open_upload(job_id, "small.bin")
    small.write(b"tiny")
    small.commit()
    assert keys(s3_endpoint, s3_url) == [
        f"uploads/{job_id}/small.bin",
        f"uploads/{job_id}/weights.bin",
    ]
    assert sink.ref == f"{s3_url}/uploads/{job_id}/weights.bin"
    assert storage.upload_bytes(job_id) == len(big) + 4
    bucket = s3_url[5:].split("/")[0]
    body = s3_client(s3_endpoint).get_object(Bucket=bucket, Key=f"svc/uploads/{job_id}/weights.bin")
    assert hashlib.sha256(body["Body"].read()).digest() == hashlib.sha256(big).digest()

    aborted = storage.open_upload(job_id, "refused.bin")
    aborted.write(big)  # two parts already sent
    aborted.abort()
    assert f"uploads/{job_id}/refused.bin" not in keys(s3_endpoint, s3_url)
    pending = s3_client(s3_endpoint).list_multipart_uploads(Bucket=bucket)
    assert pending.get("Uploads", []) == []

    storage.remove_uploads(job_id)
    assert keys(s3_endpoint, s3_url) == []


def test_publish_puts_the_manifest_last_and_serves_ranges(
    make_storage: Callable[[str], S3Storage], s3_endpoint: str, s3_url: str
) -> None:
    worker, api = make_storage("worker"), make_storage("api")
    job_id = _job_id()
    files = {"model.onnx": os.urandom(6 * 1024**2), "report.json": b'{"a": 1}'}
    hashes = _publishable(worker, job_id, files)
    assert api.read_manifest(job_id) is None
    manifest = worker.publish(job_id)
    assert not worker.scratch(job_id).exists()
    assert {f.name: f.sha256 for f in manifest.files} == hashes
    assert keys(s3_endpoint, s3_url, "artifacts/") == sorted(
        f"artifacts/{job_id}/{n}" for n in [*files, MANIFEST]
    )
    # The API, on another root, reads what the worker published.
    assert api.read_manifest(job_id) == manifest
    assert api.read_artifact(job_id, "report.json") == b'{"a": 1}'
    assert api.read_artifact(job_id, "secret.txt") is None
    streamed = b"".join(api.open_artifact(job_id, "model.onnx"))
    assert hashlib.sha256(streamed).hexdigest() == hashes["model.onnx"]
    assert (
        b"".join(api.open_artifact(job_id, "model.onnx", (100, 1100)))
        == files["model.onnx"][100:1100]
    )
    expected = sum(len(d) for d in files.values()) + len(
        (json.dumps(manifest.model_dump())).encode()
    )
    assert abs(api.artifact_bytes(job_id) - expected) < 200  # the manifest's own JSON spacing
    api.remove_artifacts(job_id)
    assert api.read_manifest(job_id) is None and keys(s3_endpoint, s3_url) == []


_KILL_MID_PUBLISH = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from worker.s3 import S3Storage
    from worker.settings import WorkerSettings

    settings = WorkerSettings.model_validate_json(sys.argv[1])
    storage = S3Storage(settings.storage_dir, settings.storage_url, settings)
    sent = []

    def die_on_second_object(params, **_):
        # botocore's own event hook: the process dies for real, in the middle of publishing,
        # after the first file is in the bucket and before the second is.
        sent.append(params.get("url"))
        if len(sent) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    storage.client.meta.events.register("before-call.s3.PutObject", die_on_second_object)
    storage.client.meta.events.register(
        "before-call.s3.CreateMultipartUpload", die_on_second_object
    )
    storage.publish(sys.argv[2])
    """
)


def test_a_publish_killed_part_way_leaves_no_manifest_and_the_rerun_publishes(
    make_storage: Callable[[str], S3Storage], s3_endpoint: str, s3_url: str, tmp_path: Path
) -> None:
    worker = make_storage("worker")
    job_id = _job_id()
    files = {"a.bin": b"first", "b.bin": b"second", "report.json": b"{}"}
    _publishable(worker, job_id, files)
    settings = WorkerSettings(**s3_settings(s3_endpoint, s3_url, tmp_path / "worker"))
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_MID_PUBLISH, settings.model_dump_json(), job_id],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    stored = keys(s3_endpoint, s3_url, "artifacts/")
    assert stored == [f"artifacts/{job_id}/a.bin"]  # one file up, no manifest
    assert make_storage("api").read_manifest(job_id) is None
    # The redelivered job publishes again, over the partial upload.
    worker.publish(job_id)
    assert make_storage("api").read_manifest(job_id) is not None
    assert len(keys(s3_endpoint, s3_url, "artifacts/")) == 4


@pytest.fixture
def store(redis_url: str, key_prefix: str) -> Iterator[JobStore]:
    client = redis_client(redis_url)
    yield JobStore(client, key_prefix)
    client.close()


class RecordingLibrary:
    """``compress``'s contract, recording what the job could read on the worker's disk."""

    def __init__(self) -> None:
        self.weights: bytes | None = None
        self.dataset_files: dict[str, bytes] = {}

    def __call__(
        self,
        config: CompressionConfig,
        *,
        weights: Path | None,
        out_dir: Path,
        progress: Callable[[ProgressEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        checkpoint_dir: Path | None = None,
    ) -> CompressionReport:
        assert weights is not None and weights.is_file()
        self.weights = weights.read_bytes()
        name, _, root = config.dataset.partition(":")
        assert name == "imagefolder" and Path(root).is_dir(), config.dataset
        self.dataset_files = {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in Path(root).rglob("*")
            if p.is_file()
        }
        write_outputs(out_dir)
        return make_report()


def test_run_job_on_s3_stages_inputs_publishes_and_accounts_bytes(
    make_storage: Callable[[str], S3Storage], store: JobStore, s3_endpoint: str, s3_url: str
) -> None:
    api, worker = make_storage("api"), make_storage("worker")
    job_id = _job_id()
    # What the API does: weights streamed in, an unpacked dataset uploaded from staging.
    sink = api.open_upload(job_id, "weights.bin")
    sink.write(b"weights-bytes")
    sink.commit()
    staged = api.uploads(job_id) / "dataset" / "pets"
    for cls in ("cat", "dog"):
        (staged / cls).mkdir(parents=True)
        (staged / cls / "0.png").write_bytes(cls.encode())
    dataset_ref = api.store_upload_tree(job_id, staged)
    assert not api.uploads(job_id).exists()  # staging removed once stored
    config = CompressionConfig(model="resnet18", dataset=f"imagefolder:{dataset_ref}")
    now = time.time()
    record = JobRecord(
        id=job_id,
        owner="owner-a",
        state=JobState.queued,
        config=config,
        weights=sink.ref,
        created_at=now,
        updated_at=now,
    )
    ledger = Ledger(store)
    upload_bytes = api.upload_bytes(job_id)
    assert upload_bytes == len(b"weights-bytes") + 6
    assert ledger.create_job(record, max_jobs=0, max_bytes=0, upload_bytes=upload_bytes) is None
    assert ledger.stored_bytes("owner-a") == upload_bytes

    lib = RecordingLibrary()
    state = run_job(
        record.payload(),
        store=store,
        storage=worker,
        max_redeliveries=2,
        can_retry=False,
        compress=lib,
    )
    assert state is JobState.succeeded
    assert lib.weights == b"weights-bytes"
    assert lib.dataset_files == {"cat/0.png": b"cat", "dog/0.png": b"dog"}
    assert keys(s3_endpoint, s3_url, "uploads/") == []  # inputs removed at the end
    assert not worker.scratch(job_id).exists()
    manifest = api.read_manifest(job_id)
    assert manifest is not None and {f.name for f in manifest.files} == {
        "report.json",
        "model.onnx",
    }
    assert ledger.stored_bytes("owner-a") == api.artifact_bytes(job_id) > 0
    # The payload on the queue names the bucket, never a path of the API's machine.
    payload = JobPayload.model_validate(record.payload().model_dump(mode="json"))
    assert payload.weights and payload.weights.startswith("s3://")
    assert str(api.root) not in payload.model_dump_json()
