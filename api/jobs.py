"""Creating jobs: read the request, validate everything, store the job, enqueue it.

Validation happens before anything is enqueued; a refused request leaves no job and no files.
Field names in errors are dotted paths into the request (``spec.config.target_macs`` for the
multipart form, ``config.target_macs`` for a JSON body).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from pathlib import Path

from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.archives import extract_archive, imagefolder_root
from api.errors import ApiError
from api.schemas import UPLOAD_DATASET, JobSpec
from api.settings import ApiSettings
from api.uploads import MAX_TEXT_FIELD_BYTES, check_content_length, receive_multipart
from flow_compress.config import CompressionConfig
from flow_compress.errors import FlowCompressError
from flow_compress.refs import known_num_classes, parse_dataset_ref
from flow_compress.registry import get_architecture
from worker.celery_app import TASK_NAME, FlowCelery
from worker.jobs import JobError, JobRecord, JobState
from worker.storage import Storage, sha256_file
from worker.store import JobStore

log = logging.getLogger(__name__)

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
WEIGHTS_FILE = "weights.bin"
ARCHIVE_FILE = "dataset.archive"


class JobService:
    """The write side of the API (reads are simple store lookups in the routes)."""

    def __init__(
        self, settings: ApiSettings, store: JobStore, storage: Storage, celery: FlowCelery
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.celery = celery

    # ------------------------------------------------------------------ create
    async def create(
        self, request: Request, owner: str, idempotency_key: str | None
    ) -> tuple[JobRecord, bool]:
        """Create and enqueue a job; returns it and whether it is new (False: the
        Idempotency-Key named an earlier job, which is returned unchanged)."""
        if idempotency_key is not None:
            if not _IDEMPOTENCY_KEY.match(idempotency_key):
                raise ApiError(
                    "validation_error",
                    "Idempotency-Key must be 1-200 visible ASCII characters",
                    field="Idempotency-Key",
                )
            earlier = await run_in_threadpool(self._earlier_job, owner, idempotency_key)
            if earlier is not None:
                return earlier, False

        job_id = uuid.uuid4().hex
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        upload_dir = self.storage.uploads(job_id)
        try:
            if content_type == "multipart/form-data":
                record = await self._from_multipart(request, job_id, owner, upload_dir)
            elif content_type == "application/json":
                record = await self._from_json(request, job_id, owner)
            else:
                raise ApiError(
                    "unsupported_media_type",
                    "send multipart/form-data (with uploads) or application/json",
                )
            return await run_in_threadpool(self._enqueue, record, idempotency_key)
        except BaseException:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise

    def _earlier_job(self, owner: str, key: str) -> JobRecord | None:
        job_id = self.store.idempotent_job(owner, key)
        record = self.store.get(job_id) if job_id else None
        return record if record is not None and record.owner == owner else None

    async def _from_multipart(
        self, request: Request, job_id: str, owner: str, upload_dir: Path
    ) -> JobRecord:
        upload_dir.mkdir(parents=True)
        specs: list[JobSpec] = []

        def on_text(name: str, text: str) -> None:
            # Validated as soon as the field ends: a bad spec sent first is refused before
            # a large weights file is read.
            specs.append(self.parse_spec(text, "spec"))

        form = await receive_multipart(
            request,
            upload_dir,
            file_fields={"weights": WEIGHTS_FILE, "dataset": ARCHIVE_FILE},
            text_fields={"spec"},
            max_bytes=self.settings.max_upload_bytes,
            on_text=on_text,
        )
        if not specs:
            raise ApiError("validation_error", "the spec form field is required", field="spec")
        spec = specs[0]
        weights = form.files.get("weights")
        if weights is not None and spec.weights_uri:
            raise ApiError(
                "validation_error",
                "send either a weights file or spec.weights_uri, not both",
                field="weights",
            )
        if weights is not None and weights.size == 0:
            raise ApiError("bad_checkpoint", "the weights file is empty", field="weights")

        config = spec.config
        archive = form.files.get("dataset")
        dataset_sha256 = None
        if archive is not None:
            if config.dataset != UPLOAD_DATASET:
                raise ApiError(
                    "validation_error",
                    f"spec.config.dataset must be {UPLOAD_DATASET!r} when a dataset archive "
                    "is attached",
                    field="spec.config.dataset",
                )
            config = await run_in_threadpool(self._unpack_dataset, config, archive.path)
            dataset_sha256 = archive.sha256
        else:
            config = self.resolve_dataset(config, "spec.config")

        if weights is not None:
            weights_path, weights_sha256 = weights.path, weights.sha256
        elif spec.weights_uri:
            weights_path, weights_sha256 = await run_in_threadpool(
                self.resolve_weights_uri, spec.weights_uri, "spec.weights_uri"
            )
        else:
            raise ApiError(
                "validation_error",
                "attach a weights file or set spec.weights_uri",
                field="weights",
            )
        return self._record(job_id, owner, config, weights_path, weights_sha256, dataset_sha256)

    async def _from_json(self, request: Request, job_id: str, owner: str) -> JobRecord:
        check_content_length(request, MAX_TEXT_FIELD_BYTES)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_TEXT_FIELD_BYTES:
                raise ApiError(
                    "payload_too_large", f"a JSON body is limited to {MAX_TEXT_FIELD_BYTES} bytes"
                )
        spec = self.parse_spec(bytes(body), "")
        if not spec.weights_uri:
            raise ApiError(
                "validation_error",
                "a JSON body must set weights_uri (upload weights with multipart/form-data)",
                field="weights_uri",
            )
        config = self.resolve_dataset(spec.config, "config")
        weights_path, weights_sha256 = await run_in_threadpool(
            self.resolve_weights_uri, spec.weights_uri, "weights_uri"
        )
        return self._record(job_id, owner, config, weights_path, weights_sha256, None)

    @staticmethod
    def _record(
        job_id: str,
        owner: str,
        config: CompressionConfig,
        weights: Path,
        weights_sha256: str,
        dataset_sha256: str | None,
    ) -> JobRecord:
        now = time.time()
        return JobRecord(
            id=job_id,
            owner=owner,
            state=JobState.queued,
            config=config,
            weights=str(weights),
            weights_sha256=weights_sha256,
            dataset_sha256=dataset_sha256,
            created_at=now,
            updated_at=now,
            message="queued",
        )

    def _enqueue(self, record: JobRecord, idempotency_key: str | None) -> tuple[JobRecord, bool]:
        if idempotency_key is not None:
            earlier_id = self.store.claim_idempotency_key(
                record.owner, idempotency_key, record.id, self.settings.idempotency_ttl_s
            )
            earlier = self.store.get(earlier_id) if earlier_id else None
            if earlier is not None:
                # A concurrent request with the same key won the race: answer with its job.
                self.storage.remove_uploads(record.id)
                return earlier, False
        self.store.create(record)
        try:
            self.celery.send_task(
                TASK_NAME,
                args=[record.payload().model_dump(mode="json")],
                task_id=record.id,
                queue=self.settings.queue,
            )
        except Exception as exc:
            log.error("enqueueing job %s failed: %s", record.id, exc)
            self.store.finish(
                record.id,
                JobState.failed,
                error=JobError(code="broker_unavailable", message="the job could not be queued"),
            )
            if idempotency_key is not None:
                self.store.release_idempotency_key(record.owner, idempotency_key, record.id)
            raise ApiError("broker_unavailable", "the queue is unreachable; retry later") from exc
        return record, True

    # ------------------------------------------------------------------ validation
    def parse_spec(self, raw: str | bytes, prefix: str) -> JobSpec:
        """Parse and statically validate a spec: fields, architecture, dataset reference."""
        try:
            spec = JobSpec.model_validate_json(raw)
        except ValidationError as exc:
            raise ApiError.from_validation(exc, prefix) from None
        config_field = f"{prefix}.config" if prefix else "config"
        try:
            get_architecture(spec.config.model)
        except FlowCompressError as exc:
            raise ApiError.from_library(exc, f"{config_field}.model") from None
        if spec.config.dataset != UPLOAD_DATASET:
            try:
                parse_dataset_ref(spec.config.dataset)
            except FlowCompressError as exc:
                raise ApiError.from_library(exc, f"{config_field}.dataset") from None
        return spec

    def resolve_dataset(self, config: CompressionConfig, config_field: str) -> CompressionConfig:
        """Check a dataset reference against this server and pin its path.

        Built-in names pass as they are. A reference with a path must name an existing
        folder inside ``storage_dir/datasets`` (relative paths are taken from there) or one
        of ``dataset_roots``; the job then carries the absolute, resolved path.
        """
        field = f"{config_field}.dataset"
        if config.dataset == UPLOAD_DATASET:
            raise ApiError(
                "validation_error",
                f"dataset {UPLOAD_DATASET!r} needs a dataset archive in the 'dataset' form field",
                field=field,
            )
        try:
            ref = parse_dataset_ref(config.dataset)
        except FlowCompressError as exc:
            raise ApiError.from_library(exc, field) from None
        known = known_num_classes(ref)
        if known is not None and config.num_classes not in (None, known):
            raise ApiError(
                "validation_error",
                f"{ref.name} has {known} classes, not {config.num_classes}",
                field=f"{config_field}.num_classes",
            )
        if ref.root is None:
            return config
        path = self._dataset_path(ref.root, field)
        return config.model_copy(update={"dataset": f"{ref.name}:{path}"})

    def _dataset_path(self, root: str, field: str) -> Path:
        datasets = self.storage.datasets_dir
        if Path(root).is_absolute():
            path = Path(root).resolve()
            allowed = [datasets, *(Path(r).resolve() for r in self.settings.dataset_roots)]
            if not any(path.is_relative_to(a) for a in allowed):
                raise ApiError(
                    "invalid_dataset",
                    f"dataset paths must lie under {', '.join(map(str, allowed))}",
                    field=field,
                )
        else:
            try:
                path = self.storage.resolve_inside(root, base=datasets)
            except ValueError as exc:
                raise ApiError("invalid_dataset", str(exc), field=field) from None
        if not path.exists():
            raise ApiError("dataset_not_found", f"no dataset at {path}", field=field)
        return path

    def resolve_weights_uri(self, uri: str, field: str) -> tuple[Path, str]:
        """A server-side weights file (relative to the storage root) and its sha256."""
        relative = uri.removeprefix("storage://")
        try:
            path = self.storage.resolve_inside(relative)
        except ValueError as exc:
            raise ApiError("validation_error", str(exc), field=field) from None
        if path.is_relative_to(self.storage.redis_dir) or not path.is_file():
            raise ApiError("bad_checkpoint", f"no weights file at {uri}", field=field)
        return path, sha256_file(path)

    def _unpack_dataset(self, config: CompressionConfig, archive: Path) -> CompressionConfig:
        target = archive.parent / "dataset"
        extract_archive(
            archive,
            target,
            max_bytes=self.settings.max_extract_bytes,
            max_files=self.settings.max_archive_files,
        )
        archive.unlink()  # the extracted tree is what the job reads
        root, n_classes = imagefolder_root(target)
        if config.num_classes not in (None, n_classes):
            raise ApiError(
                "validation_error",
                f"the archive holds {n_classes} classes, not {config.num_classes}",
                field="spec.config.num_classes",
            )
        return config.model_copy(update={"dataset": f"imagefolder:{root}"})

    # ------------------------------------------------------------------ cancel
    def cancel(self, record: JobRecord) -> JobRecord:
        """Cancel (see ``JobStore.request_cancel``); a job cancelled while queued loses its
        uploads now, since no worker will ever run it."""
        updated = self.store.request_cancel(record.id)
        if updated is None:
            raise ApiError("not_found", f"no job {record.id}")
        if updated.state is JobState.cancelled and record.state is JobState.queued:
            self.storage.remove_uploads(record.id)
        return updated
