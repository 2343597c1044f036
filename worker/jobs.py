"""What a job is: its states, its stored record, and the task message that runs it.

``JobPayload`` is the Celery message body. It embeds the library's ``CompressionConfig``
unchanged, so the HTTP spec, the queue payload and the library input cannot drift.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from flow_compress.config import CompressionConfig
from worker.notify import NotifyTarget, WebhookDelivery


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


class JobError(BaseModel):
    """Why a job failed: ``code`` is stable snake_case, ``message`` is for people."""

    model_config = ConfigDict(extra="forbid")

    code: str
    message: str


class JobPayload(BaseModel):
    """The task message: everything the worker needs, with server-side paths resolved.

    ``weights`` is an absolute path under the storage root (an upload or a ``weights_uri``).
    ``config`` is the client's; ``dataset_path``, when set, is the dataset reference the
    worker reads instead of ``config.dataset`` (the server path an uploaded archive or a
    relative reference resolved to), which clients never see.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(..., pattern=r"^[0-9a-f]{32}$")
    config: CompressionConfig
    weights: str | None = None
    dataset_path: str | None = None

    def library_config(self) -> CompressionConfig:
        """The config the library runs: the client's, reading the resolved dataset."""
        if self.dataset_path is None:
            return self.config
        return self.config.model_copy(update={"dataset": self.dataset_path})


class JobRecord(BaseModel):
    """One job as the store holds it (a Redis hash). Times are Unix seconds."""

    model_config = ConfigDict(extra="forbid")

    id: str
    owner: str
    state: JobState
    config: CompressionConfig
    weights: str | None = None
    dataset_path: str | None = Field(
        None, description="Server-side dataset reference the worker reads (never shown)."
    )
    weights_sha256: str | None = None
    dataset_sha256: str | None = None
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    percent: float = 0.0
    macs: int | None = None
    top1: float | None = None
    message: str = ""
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = Field(0, description="Times a worker started this job.")
    redeliveries: int = Field(0, description="Times it was taken over after a worker died.")
    cancel_requested: bool = False
    error: JobError | None = None
    result: dict[str, float | bool] | None = Field(
        None,
        description="Headline numbers of a succeeded job, copied from its report, and its "
        "verdict target_met (false: published although the MACs target was missed).",
    )
    expired_at: float | None = Field(
        None, description="When its files were removed (retention, or its owner deleted them)."
    )
    expired_reason: str | None = Field(None, description="'retention' or 'deleted'.")
    notify: NotifyTarget | None = None
    delivery: WebhookDelivery | None = Field(
        None, description="The webhook delivery of the job's end (set when it ends)."
    )

    def payload(self) -> JobPayload:
        return JobPayload(
            job_id=self.id, config=self.config, weights=self.weights, dataset_path=self.dataset_path
        )
