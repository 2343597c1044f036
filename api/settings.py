"""API settings: the worker's settings plus keys and upload limits (``FLOW_COMPRESS_`` env)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from worker.settings import WorkerSettings


class ApiSettings(WorkerSettings):
    """``api_keys`` is a comma-separated list; when empty, the API is open (one shared owner)."""

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_upload_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Largest request body (weights plus dataset archive)."
    )
    max_extract_bytes: int = Field(8 * 1024**3, ge=1024, description="Unpacked archive size cap.")
    max_archive_files: int = Field(200_000, ge=1, description="Files in one dataset archive.")
    idempotency_ttl_s: int = Field(24 * 3600, ge=60)
    shared_weights_dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Folders under storage_dir whose files any key may name as weights_uri "
        "(comma-separated, relative to storage_dir); a key may always name its own uploads.",
    )
    download_datasets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Dataset names a job may download (data.download=true); empty: none.",
    )
    max_job_steps: int = Field(
        200_000, ge=1, description="Most optimisation steps one job may ask for (all stages)."
    )
    max_job_images: int = Field(
        50_000_000, ge=1, description="Most training images one job may feed (steps x batch)."
    )
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="A request body that sends nothing for this long is refused."
    )
    upload_min_bytes_per_s: int = Field(
        16 * 1024,
        ge=0,
        description="Slowest average body rate accepted once upload_idle_timeout_s has passed.",
    )
    public_docs: bool = Field(
        False, description="Serve /docs, /redoc and /openapi.json without a key."
    )
    redis_timeout_s: float = Field(
        1.0, gt=0, le=60, description="Connect and socket timeout of the API's Redis client."
    )
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token a /metrics scrape must send; unset: /metrics is open."
    )
    metrics_storage_interval_s: float = Field(
        60.0, ge=0, description="Seconds between two walks of the storage folder (metrics)."
    )
    sse_ping_s: float = Field(
        15, gt=0, le=300, description="Heartbeat comment interval of event streams (seconds)."
    )

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, v: object) -> object:
        # docker compose passes an unset variable as "": that means no token, not "".
        return None if v == "" else v

    # Quotas per key (0 = unlimited), checked atomically at submission (worker.usage).
    preflight_concurrency: int = Field(
        1, ge=1, le=64, description="Preflights (POST /v1/preflight) run at once per API process."
    )
    preflight_queue_s: float = Field(
        15.0, gt=0, le=600, description="Wait for a free preflight slot before answering 503."
    )
    preflight_timeout_s: float = Field(
        180.0, gt=0, le=3600, description="A preflight child running longer is stopped (504)."
    )
    quota_jobs: int = Field(0, ge=0, description="Queued plus running jobs per key.")
    quota_bytes: int = Field(0, ge=0, description="Stored upload and artifact bytes per key.")
    quota_retry_after_s: int = Field(60, ge=1, description="Retry-After of a 429.")
    # Keys that see every key's usage on GET /v1/usage; they are API keys too.
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # S3 storage only: answer artifact downloads with 307 to a presigned URL of this lifetime.
    download_redirect: bool = False
    presign_ttl_s: int = Field(900, ge=1, le=7 * 24 * 3600)

    @field_validator(
        "api_keys", "admin_keys", "shared_weights_dirs", "download_datasets", mode="before"
    )
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="after")
    def _admins_are_keys(self) -> ApiSettings:
        # An admin key authenticates like any key (its own jobs, its own owner id); listing it
        # only in FLOW_COMPRESS_ADMIN_KEYS is enough.
        missing = [k for k in self.admin_keys if k not in self.api_keys]
        if missing:
            self.api_keys = [*self.api_keys, *missing]
        return self
