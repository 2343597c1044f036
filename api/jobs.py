"""Creating jobs: read the request, validate everything, store the job, enqueue it.

Validation happens before anything is enqueued; a refused request leaves no job and no files.
Field names in errors are dotted paths into the request (``spec.config.target_macs`` for the
multipart form, ``config.target_macs`` for a JSON body).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.archives import extract_archive, imagefolder_root
from api.errors import ApiError
from api.hashing import FileHasher
from api.limits import check_job
from api.schemas import UPLOAD_DATASET, JobSpec
from api.settings import ApiSettings
from api.uploads import ReceivedFile, RequestBody, read_json_body, receive_multipart
from api.weights import WEIGHTS_FILE, WeightsPolicy
from flow_compress.arch import list_architectures
from flow_compress.arch.catalogue import resolve_name
from flow_compress.config import CompressionConfig
from flow_compress.errors import FlowCompressError
from flow_compress.refs import known_num_classes, parse_dataset_ref
from worker.capabilities import refusal
from worker.catalogue import CatalogueReader
from worker.celery_app import TASK_NAME, FlowCelery
from worker.jobs import JobError, JobRecord, JobState
from worker.notify import NotifyTarget, WebhookUrlError, check_target_url
from worker.retention import REASON_DELETED, expire_job, remove_uploads
from worker.storage import FileSink, Storage
from worker.store import JobStore
from worker.telemetry import live_workers
from worker.usage import Idempotency, Ledger, QuotaRefusal, Refused, Replayed

log = logging.getLogger(__name__)

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
ARCHIVE_FILE = "dataset.archive"


def weights_from_cache(config: CompressionConfig) -> bool:
    """Whether the job's weights come from the worker's local caches (an ``hf-hub:``
    reference, ``pretrained``), so the request needs none."""
    return config.pretrained or config.model.startswith("hf-hub:")


def fingerprint(spec: JobSpec, weights_sha256: str | None, dataset_sha256: str | None) -> str:
    """What an Idempotency-Key is bound to: the spec as parsed (so key order, spacing and
    defaults spelled out do not matter) and the content of the uploaded files."""
    canonical = json.dumps(
        {
            "spec": spec.model_dump(mode="json"),
            "weights": weights_sha256,
            "dataset": dataset_sha256,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class _Draft:
    """A job built from a request, not stored yet, and the request's fingerprint."""

    record: JobRecord
    fingerprint: str


def check_uploaded_weights(spec: JobSpec, weights: ReceivedFile | None) -> None:
    """An uploaded weights file excludes ``spec.weights_uri`` and must not be empty (the same
    rule for a job and for its preflight)."""
    if weights is None:
        return
    if spec.weights_uri:
        raise ApiError(
            "validation_error",
            "send either a weights file or spec.weights_uri, not both",
            field="weights",
        )
    if weights.size == 0:
        raise ApiError("bad_checkpoint", "the weights file is empty", field="weights")


class JobService:
    """The write side of the API (reads are simple store lookups in the routes)."""

    def __init__(
        self,
        settings: ApiSettings,
        store: JobStore,
        storage: Storage,
        celery: FlowCelery,
        hasher: FileHasher | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.celery = celery
        self.hasher = hasher or FileHasher(store.r, store.prefix)
        self.weights = WeightsPolicy(storage, store, self.hasher, settings.shared_weights_dirs)
        self.ledger = Ledger(store)
        self.catalogue = CatalogueReader(store.r, store.prefix)

    # ------------------------------------------------------------------ create
    async def create(
        self, body: RequestBody, owner: str, idempotency_key: str | None
    ) -> tuple[JobRecord, bool]:
        """Create and enqueue a job; returns it and whether it is new (False: the
        Idempotency-Key named an earlier job made by the same request, which is returned
        unchanged; the same key with a different request is ``idempotency_key_reused``)."""
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise ApiError(
                "validation_error",
                "Idempotency-Key must be 1-200 visible ASCII characters",
                field="Idempotency-Key",
            )
        # Refused before the body is read when a limit is already reached; the same check
        # is repeated atomically with the job's insertion (``_enqueue``).
        if self.settings.quota_jobs or self.settings.quota_bytes:
            await run_in_threadpool(self._check_quota, owner)
        job_id = uuid.uuid4().hex
        content_type = (body.content_type or "").split(";")[0].strip().lower()
        upload_dir = self.storage.uploads(job_id)
        try:
            if content_type == "multipart/form-data":
                draft = await self._from_multipart(body, job_id, owner, upload_dir)
            elif content_type == "application/json":
                draft = await self._from_json(body, job_id, owner)
            else:
                raise ApiError(
                    "unsupported_media_type",
                    "send multipart/form-data (with uploads) or application/json",
                )
            created = await run_in_threadpool(self._enqueue, draft, idempotency_key)
        except BaseException:
            # Nothing of a refused request is left, here or in a remote store.
            await run_in_threadpool(self.storage.remove_uploads, job_id)
            raise
        await run_in_threadpool(self.storage.discard_staging, job_id)
        return created

    async def _from_multipart(
        self, body: RequestBody, job_id: str, owner: str, upload_dir: Path
    ) -> _Draft:
        upload_dir.mkdir(parents=True)
        specs: list[JobSpec] = []

        def on_text(name: str, text: str) -> None:
            # Validated as soon as the field ends: a bad spec sent first is refused before
            # a large weights file is read.
            specs.append(self.parse_spec(text, "spec"))

        form = await receive_multipart(
            body,
            file_fields={
                # Weights stream straight into the store; an archive is unpacked (and checked)
                # here first, so it is staged in the local upload folder.
                "weights": lambda: self.storage.open_upload(job_id, WEIGHTS_FILE),
                "dataset": lambda: FileSink(upload_dir / ARCHIVE_FILE),
            },
            text_fields={"spec"},
            max_bytes=self.settings.max_upload_bytes,
            on_text=on_text,
        )
        if not specs:
            raise ApiError("validation_error", "the spec form field is required", field="spec")
        spec = specs[0]
        weights = form.files.get("weights")
        check_uploaded_weights(spec, weights)

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
            dataset_path = await run_in_threadpool(
                self._unpack_dataset, job_id, config, archive.ref
            )
            dataset_sha256 = archive.sha256
        else:
            dataset_path = self.resolve_dataset(config, "spec.config")

        if weights is not None:
            weights_path, weights_sha256 = weights.ref, weights.sha256
        elif spec.weights_uri:
            found = await self.weights.resolve(spec.weights_uri, owner, job_id, "spec.weights_uri")
            weights_path, weights_sha256 = str(found.path), found.sha256
        elif weights_from_cache(config):
            weights_path, weights_sha256 = None, None
        else:
            raise ApiError(
                "validation_error",
                "attach a weights file or set spec.weights_uri",
                field="weights",
            )
        record = self._record(
            job_id,
            owner,
            config,
            dataset_path,
            weights_path,
            weights_sha256,
            dataset_sha256,
            spec.notify,
        )
        uploaded = weights.sha256 if weights is not None else None
        return _Draft(record, fingerprint(spec, uploaded, dataset_sha256))

    async def _from_json(self, body: RequestBody, job_id: str, owner: str) -> _Draft:
        spec = self.parse_spec(await read_json_body(body), "")
        if not spec.weights_uri and not weights_from_cache(spec.config):
            raise ApiError(
                "validation_error",
                "a JSON body must set weights_uri (upload weights with multipart/form-data)",
                field="weights_uri",
            )
        dataset_path = self.resolve_dataset(spec.config, "config")
        weights_path = weights_sha256 = None
        if spec.weights_uri:
            found = await self.weights.resolve(spec.weights_uri, owner, job_id, "weights_uri")
            weights_path, weights_sha256 = str(found.path), found.sha256
        record = self._record(
            job_id,
            owner,
            spec.config,
            dataset_path,
            weights_path,
            weights_sha256,
            None,
            spec.notify,
        )
        return _Draft(record, fingerprint(spec, None, None))

    @staticmethod
    def _record(
        job_id: str,
        owner: str,
        config: CompressionConfig,
        dataset_path: str | None,
        weights: str | None,
        weights_sha256: str | None,
        dataset_sha256: str | None,
        notify: NotifyTarget | None,
    ) -> JobRecord:
        now = time.time()
        return JobRecord(
            id=job_id,
            owner=owner,
            state=JobState.queued,
            config=config,
            dataset_path=dataset_path,
            weights=weights,
            weights_sha256=weights_sha256,
            dataset_sha256=dataset_sha256,
            created_at=now,
            updated_at=now,
            message="queued",
            notify=notify,
        )

    def _check_quota(self, owner: str) -> None:
        limits = self.settings
        if not (limits.quota_jobs or limits.quota_bytes):
            return
        active, stored = self.ledger.counts(owner)
        if limits.quota_jobs and active >= limits.quota_jobs:
            raise self._quota_error(QuotaRefusal.jobs)
        if limits.quota_bytes and stored >= limits.quota_bytes:
            raise self._quota_error(QuotaRefusal.bytes)

    def _quota_error(self, which: QuotaRefusal) -> ApiError:
        what = {
            QuotaRefusal.jobs: f"{self.settings.quota_jobs} queued or running jobs",
            QuotaRefusal.bytes: f"{self.settings.quota_bytes} stored bytes",
        }[which]
        return ApiError(
            "quota_exceeded",
            f"this key's quota of {what} is reached; retry when jobs finish or files expire "
            "(DELETE a finished job to remove its files now)",
            headers={"Retry-After": str(self.settings.quota_retry_after_s)},
        )

    def _enqueue(self, draft: _Draft, idempotency_key: str | None) -> tuple[JobRecord, bool]:
        record = draft.record
        idempotency = (
            Idempotency(idempotency_key, draft.fingerprint, self.settings.idempotency_ttl_s)
            if idempotency_key is not None
            else None
        )
        # One atomic step: the quota check, the job's insertion and the key's binding.
        outcome = self.ledger.create_job(
            record,
            max_jobs=self.settings.quota_jobs,
            max_bytes=self.settings.quota_bytes,
            upload_bytes=self.storage.upload_bytes(record.id),
            idempotency=idempotency,
        )
        if isinstance(outcome, Replayed):
            earlier_record = self.store.get(outcome.job_id)
            if earlier_record is not None:
                self.storage.remove_uploads(record.id)
                if outcome.fingerprint not in (None, draft.fingerprint):
                    raise ApiError(
                        "idempotency_key_reused",
                        f"Idempotency-Key was used for a different request (job "
                        f"{earlier_record.id}); use a new key for a new request",
                        field="Idempotency-Key",
                    )
                return earlier_record, False
            # The earlier job vanished between the check and now (an operator removed it).
            raise ApiError("broker_unavailable", "the request raced a removal; retry it")
        if isinstance(outcome, Refused):
            raise self._quota_error(outcome.limit)  # create() removes the uploads
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
        if spec.notify is not None:
            try:
                check_target_url(spec.notify.url, self.settings.webhook_allowed_hosts)
            except WebhookUrlError as exc:
                field = f"{prefix}.notify.url" if prefix else "notify.url"
                raise ApiError(exc.code, exc.message, field=field) from None
        config_field = f"{prefix}.config" if prefix else "config"
        try:
            self.check_model(spec.config.model)
        except FlowCompressError as exc:
            raise ApiError.from_library(exc, f"{config_field}.model") from None
        if spec.config.dataset != UPLOAD_DATASET:
            try:
                parse_dataset_ref(spec.config.dataset)
            except FlowCompressError as exc:
                raise ApiError.from_library(exc, f"{config_field}.dataset") from None
        check_job(spec.config, self.settings, config_field)
        self.check_deployment(spec.config, config_field)
        return spec

    def check_deployment(self, config: CompressionConfig, config_field: str) -> None:
        """Refuse a deployment no live worker can run (``deployment_unavailable``): each
        worker publishes whether it has a GPU and which ONNX Runtime providers, with its
        heartbeat (``worker.capabilities``). With no worker alive or none that published, the
        job is accepted and the worker refuses it before any work if it must."""
        if config.deployment is None:
            return
        published = [
            c
            for b in live_workers(self.store.r, self.store.prefix)
            if (c := b.capabilities()) is not None
        ]
        why = refusal(config.deployment, published)
        if why is not None:
            raise ApiError("deployment_unavailable", why, field=f"{config_field}.deployment")

    def check_model(self, name: str) -> None:
        """Refuse a model reference no worker can build (``unsupported_model``, with close
        matches): checked against the newest catalogue a worker published
        (``worker.catalogue``). With none published yet, registered names (plug-ins loaded in
        this process included) and syntactically valid ``source:name`` references pass, and
        the worker fails a name it cannot build."""
        catalogue = self.catalogue.get()
        if catalogue is not None:
            catalogue.resolve(name)
        else:
            resolve_name(
                name, registered=list_architectures(), plugin=(), timm=None, torchvision=None
            )

    def resolve_dataset(self, config: CompressionConfig, config_field: str) -> str | None:
        """Check a dataset reference against this server; return the reference the worker
        reads (the resolved path) when it has one, None for a built-in name.

        A reference with a path must name an existing folder inside ``storage_dir/datasets``
        (relative paths are taken from there) or one of ``dataset_roots``. The job keeps the
        client's reference for everything clients see; refusals name only what the client
        sent, never a server path.
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
            return None
        path = self._dataset_path(ref.root, field)
        return f"{ref.name}:{path}"

    def _dataset_path(self, root: str, field: str) -> Path:
        datasets = self.storage.datasets_dir
        if Path(root).is_absolute():
            path = Path(root).resolve()
            allowed = [datasets, *(Path(r).resolve() for r in self.settings.dataset_roots)]
            if not any(path.is_relative_to(a) for a in allowed):
                raise ApiError(
                    "invalid_dataset",
                    "a dataset path must be relative to this server's datasets folder or lie "
                    "under a dataset root its operator allows",
                    field=field,
                )
        else:
            try:
                path = self.storage.resolve_inside(root, base=datasets)
            except ValueError:
                raise ApiError(
                    "invalid_dataset",
                    "a relative dataset path must stay inside this server's datasets folder",
                    field=field,
                ) from None
        if not path.is_dir():
            raise ApiError("dataset_not_found", "no dataset folder at that path", field=field)
        return path

    def _unpack_dataset(self, job_id: str, config: CompressionConfig, archive_ref: str) -> str:
        """Extract an uploaded archive next to it; return the imagefolder reference the
        worker reads (with a remote store, the unpacked tree is uploaded there first)."""
        archive = Path(archive_ref)
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
        stored = self.storage.store_upload_tree(job_id, root)
        return f"imagefolder:{stored}"

    # ------------------------------------------------------------------ cancel
    def cancel(self, record: JobRecord) -> JobRecord:
        """Cancel (see ``JobStore.request_cancel``); a job cancelled while queued loses its
        uploads now, since no worker will ever run it."""
        updated = self.store.request_cancel(record.id)
        if updated is None:
            raise ApiError("not_found", f"no job {record.id}")
        if updated.state is JobState.cancelled and record.state is JobState.queued:
            remove_uploads(self.store, self.storage, record.id)
        return updated

    def delete_files(self, record: JobRecord) -> JobRecord:
        """Remove a finished job's uploads, scratch and artifacts at its owner's request; the
        record stays, marked expired (``deleted``), and its downloads then answer 410."""
        updated = expire_job(self.store, self.storage, record.id, REASON_DELETED)
        if updated is None:
            raise ApiError("not_found", f"no job {record.id}")
        return updated
