"""API settings: the worker's settings plus keys and upload limits (``FLOW_COMPRESS_`` env)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
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

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v
