"""The S3 storage backend: uploads and artifacts in a bucket, shared by API and workers.

With ``FLOW_COMPRESS_STORAGE_URL=s3://bucket/prefix`` the API and the workers share Redis and
the bucket, nothing else. Keys keep the local layout under the prefix::

    <prefix>/uploads/<id>/weights.bin        streamed in by the API (multipart upload)
    <prefix>/uploads/<id>/dataset/…          an uploaded dataset archive, unpacked by the API
    <prefix>/artifacts/<id>/<name>           published by the worker
    <prefix>/artifacts/<id>/manifest.json    written LAST: whoever sees it sees every file

Each machine keeps a local root (``FLOW_COMPRESS_STORAGE_DIR``) for what is its own: a
worker's ``scratch/<id>`` (the job's inputs downloaded to ``inputs/``, the library's
``output/`` and ``checkpoint/``), the API's staging folder for archives being unpacked, and
server-side datasets (a dataset reference names a folder that must exist on the workers).

Publication is atomic for readers: every file is uploaded first, the manifest last (one PUT,
atomic in S3); a worker that dies mid-publish leaves no manifest, so nothing is served and the
redelivered job publishes again. Job payloads name stored inputs as ``s3://bucket/key``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from worker.storage import (
    MANIFEST,
    ArtifactCorruptError,
    Manifest,
    ManifestEntry,
    Storage,
    StorageUnavailableError,
    check_job_id,
)

if TYPE_CHECKING:
    from worker.jobs import JobPayload
    from worker.settings import WorkerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
# boto3 clients are thread-safe; a handful of threads hide per-object latency.
TRANSFER_THREADS = 8

_MISSING = {"404", "NoSuchKey", "NotFound"}
# Prefixes a weights_uri may not name: other jobs' private uploads and results.
_PRIVATE = ("uploads/", "artifacts/", "scratch/", "redis/")


def _unavailable(exc: Exception) -> bool:
    """Connection failures, timeouts and 5xx/throttling answers: worth retrying later."""
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
    return False


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in _MISSING


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (bucket, ``some/prefix``) with no trailing slash."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    return bucket, prefix.strip("/")


class S3Sink:
    """An upload streamed into one object: a single PUT when it fits in one part, otherwise
    an S3 multipart upload of ``part_size`` parts. ``abort`` leaves nothing (the multipart
    upload is aborted, so no invisible parts stay billed)."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self.storage = storage
        self.key = key
        self.ref = storage.ref(key)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

    def write(self, chunk: bytes) -> None:
        self._buffer.extend(chunk)
        if len(self._buffer) >= self.storage.part_size:
            self._flush_part()

    def _flush_part(self) -> None:
        s = self.storage
        with s.errors():
            if self._upload_id is None:
                started = s.client.create_multipart_upload(Bucket=s.bucket, Key=self.key)
                self._upload_id = started["UploadId"]
            number = len(self._parts) + 1
            answer = s.client.upload_part(
                Bucket=s.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=bytes(self._buffer),
            )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        self._buffer.clear()

    def commit(self) -> None:
        if self._done:
            return
        s = self.storage
        if self._upload_id is None:
            with s.errors():
                s.client.put_object(Bucket=s.bucket, Key=self.key, Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._flush_part()
            with s.errors():
                s.client.complete_multipart_upload(
                    Bucket=s.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        self._buffer.clear()
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer.clear()
        if self._upload_id is not None:
            try:
                self.storage.client.abort_multipart_upload(
                    Bucket=self.storage.bucket, Key=self.key, UploadId=self._upload_id
                )
            except Exception as exc:  # the store's lifecycle rules are the last resort
                log.warning("aborting multipart upload of %s failed: %s", self.key, exc)


class S3Storage(Storage):
    """Uploads and artifacts in an S3-compatible bucket; scratch and datasets on ``root``."""

    remote = True

    def __init__(self, root: Path, url: str, settings: WorkerSettings) -> None:
        super().__init__(root)
        self.bucket, self.prefix = parse_url(url)
        self.part_size = settings.s3_part_size
        # Unset values fall through to boto3's standard chain (AWS_* variables, config files,
        # instance roles); AWS_ENDPOINT_URL is honoured by boto3 itself.
        session = boto3.session.Session(
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            region_name=settings.s3_region,
        )
        config = Config(
            s3={"addressing_style": settings.s3_addressing_style},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        self.client = session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
        # Presigned URLs must name the endpoint clients reach (in docker compose the API talks
        # to http://minio:9000, a browser to http://localhost:9000).
        self.presign_client = (
            session.client("s3", endpoint_url=settings.s3_public_endpoint_url, config=config)
            if settings.s3_public_endpoint_url
            else self.client
        )
        self.transfer = TransferConfig(
            multipart_threshold=self.part_size, multipart_chunksize=self.part_size
        )

    # ------------------------------------------------------------------ keys
    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def ref(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _upload_key(self, job_id: str, name: str = "") -> str:
        return self.key(f"uploads/{check_job_id(job_id)}/{name}")

    def _artifact_key(self, job_id: str, name: str = "") -> str:
        return self.key(f"artifacts/{check_job_id(job_id)}/{name}")

    @property
    def url(self) -> str:
        return self.ref(self.prefix) if self.prefix else f"s3://{self.bucket}"

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    @contextmanager
    def errors() -> Iterator[None]:
        """Store outages become ``StorageUnavailableError`` (transient); others pass."""
        try:
            yield
        except Exception as exc:
            if _unavailable(exc):
                raise StorageUnavailableError(f"object store unavailable: {exc}") from exc
            raise

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        with self.errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                yield from page.get("Contents", [])

    def _delete_prefix(self, prefix: str) -> None:
        keys = [obj["Key"] for obj in self._list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys at most
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            with self.errors():
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )

    def _get(self, key: str) -> bytes | None:
        try:
            with self.errors():
                answer = self.client.get_object(Bucket=self.bucket, Key=key)
                return bytes(answer["Body"].read())
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    def check(self) -> None:
        with self.errors():
            self.client.head_bucket(Bucket=self.bucket)

    # ------------------------------------------------------------------ uploads
    def open_upload(self, job_id: str, name: str) -> S3Sink:
        return S3Sink(self, self._upload_key(job_id, name))

    def store_upload_tree(self, job_id: str, local: Path) -> str:
        """Upload the API's staging folder ``uploads(job_id)`` (an unpacked dataset) to the
        bucket, remove it here, and return the reference of ``local`` in the bucket."""
        staging = self.uploads(job_id)
        relative = local.relative_to(staging).as_posix()

        def put(path: Path) -> None:
            key = self._upload_key(job_id, path.relative_to(staging).as_posix())
            with self.errors():
                self.client.upload_file(str(path), self.bucket, key, Config=self.transfer)

        files = [p for p in sorted(staging.rglob("*")) if p.is_file() and not p.is_symlink()]
        _in_parallel(put, files)
        shutil.rmtree(staging, ignore_errors=True)
        return self.ref(self._upload_key(job_id, relative))

    def discard_staging(self, job_id: str) -> None:
        shutil.rmtree(self.uploads(job_id), ignore_errors=True)

    def upload_bytes(self, job_id: str) -> int:
        return sum(int(o["Size"]) for o in self._list(self._upload_key(job_id)))

    def remove_uploads(self, job_id: str) -> None:
        super().remove_uploads(job_id)  # the API's staging folder, if any
        self._delete_prefix(self._upload_key(job_id))

    def stored_file(self, relative: str) -> tuple[str, str] | None:
        """An object under the prefix (``weights_uri``), hashed as it streams; other jobs'
        uploads and artifacts cannot be named."""
        if (
            not relative
            or "\x00" in relative
            or relative.startswith("/")
            or ".." in PurePosixPath(relative).parts
        ):
            raise ValueError("expected a relative path under the storage prefix")
        if relative.startswith(_PRIVATE):
            raise ValueError("that part of the store holds jobs' own files")

        key = self.key(relative)
        try:
            with self.errors():
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
                digest = hashlib.sha256()
                for chunk in body.iter_chunks(1 << 20):
                    digest.update(chunk)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return self.ref(key), digest.hexdigest()

    def stage_inputs(self, payload: JobPayload) -> JobPayload:
        """Download the job's stored inputs into ``scratch/<id>/inputs`` and return the
        payload naming the local copies (weights and an uploaded dataset)."""
        inputs = self.scratch(payload.job_id) / "inputs"
        own = self.ref(self._upload_key(payload.job_id))
        downloaded = False

        def local(ref: str) -> str:
            nonlocal downloaded
            if ref.startswith(own):
                if not downloaded:  # the job's whole upload folder, once
                    self._download_prefix(self._upload_key(payload.job_id), inputs)
                    downloaded = True
                return str(inputs / ref[len(own) :])
            if ref.startswith(f"s3://{self.bucket}/"):
                key = ref[len(f"s3://{self.bucket}/") :]
                target = inputs / "weights_uri" / PurePosixPath(key).name
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.errors():
                    self.client.download_file(self.bucket, key, str(target), Config=self.transfer)
                return str(target)
            return ref

        update: dict[str, str | None] = {
            "weights": local(payload.weights) if payload.weights else None
        }
        # The server-side dataset reference (an uploaded archive's folder in the bucket).
        name, sep, root = (payload.dataset_path or payload.config.dataset).partition(":")
        if sep and root.startswith("s3://"):
            update["dataset_path"] = f"{name}:{local(root)}"
        return payload.model_copy(update=update)

    def _download_prefix(self, prefix: str, target: Path) -> None:
        todo: list[tuple[str, Path]] = []
        for obj in self._list(prefix):
            path = (target / obj["Key"][len(prefix) :]).resolve()
            if not path.is_relative_to(target.resolve()):  # keys came from our own API
                raise ArtifactCorruptError(f"stored key {obj['Key']!r} leaves the job folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            todo.append((obj["Key"], path))

        def get(item: tuple[str, Path]) -> None:
            with self.errors():
                self.client.download_file(self.bucket, item[0], str(item[1]), Config=self.transfer)

        _in_parallel(get, todo)

    # ------------------------------------------------------------------ artifacts
    def read_manifest(self, job_id: str) -> Manifest | None:
        raw = self._get(self._artifact_key(job_id, MANIFEST))
        if raw is None:
            return None
        try:
            return Manifest.model_validate_json(raw)
        except ValueError as exc:
            raise ArtifactCorruptError(f"{MANIFEST} is malformed: {exc}") from exc

    def artifact_entry(self, job_id: str, name: str) -> ManifestEntry | None:
        manifest = self.read_manifest(job_id)
        return manifest.entry(name) if manifest else None

    def artifact_file(self, job_id: str, name: str) -> None:
        """Artifacts have no local path here; see ``artifact_entry`` and ``open_artifact``."""
        return None

    def read_artifact(self, job_id: str, name: str) -> bytes | None:
        if self.artifact_entry(job_id, name) is None:
            return None
        return self._get(self._artifact_key(job_id, name))

    def open_artifact(
        self, job_id: str, name: str, byte_range: tuple[int, int] | None = None
    ) -> Iterator[bytes]:
        """Stream a published file (``byte_range``: start and end, end exclusive)."""
        extra = {"Range": f"bytes={byte_range[0]}-{byte_range[1] - 1}"} if byte_range else {}
        with self.errors():
            body = self.client.get_object(
                Bucket=self.bucket, Key=self._artifact_key(job_id, name), **extra
            )["Body"]
        try:
            yield from body.iter_chunks(1 << 16)
        finally:
            body.close()

    def presigned_url(self, job_id: str, name: str, ttl_s: int, disposition: str) -> str:
        return str(
            self.presign_client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": self._artifact_key(job_id, name),
                    "ResponseContentDisposition": disposition,
                },
                ExpiresIn=ttl_s,
            )
        )

    def publish(self, job_id: str) -> Manifest:
        """Verify the output, upload every file, then the manifest (last); then discard the
        scratch folder. A failure part-way leaves no manifest (the job is not published)."""
        manifest = self.verified_output(job_id)
        out = self.output(job_id)
        for entry in manifest.files:
            with self.errors():
                self.client.upload_file(
                    str(out / entry.name),
                    self.bucket,
                    self._artifact_key(job_id, entry.name),
                    Config=self.transfer,
                )
        with self.errors():
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._artifact_key(job_id, MANIFEST),
                Body=(out / MANIFEST).read_bytes(),
                ContentType="application/json",
            )
        self.discard_scratch(job_id)
        return manifest

    def artifact_bytes(self, job_id: str) -> int:
        return sum(int(o["Size"]) for o in self._list(self._artifact_key(job_id)))

    def remove_artifacts(self, job_id: str) -> None:
        with self.errors():
            self.client.delete_object(Bucket=self.bucket, Key=self._artifact_key(job_id, MANIFEST))
        self._delete_prefix(self._artifact_key(job_id))


def _in_parallel(fn: Callable[[T], None], items: list[T]) -> None:
    """Run ``fn`` over ``items`` on a few threads (an unpacked dataset is many small objects,
    each a round trip); the first exception is raised once all have stopped."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(TRANSFER_THREADS, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


__all__ = ["S3Sink", "S3Storage", "parse_url"]
