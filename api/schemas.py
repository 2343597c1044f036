"""HTTP request and response bodies. The library's ``CompressionConfig`` and
``CompressionReport`` are embedded unchanged, so the OpenAPI spec follows the library."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field

from flow_compress.config import CompressionConfig
from worker.events import LogLine
from worker.jobs import JobError, JobRecord, JobState
from worker.notify import NotifyTarget, WebhookDelivery
from worker.usage import OwnerUsage


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobSpec(_Body):
    """What to compress. Sent as the ``spec`` form field (JSON) with uploads, or as the whole
    JSON body when the weights are already on the server.

    ``config.dataset`` is a dataset reference (``digits``, ``fashion-mnist``,
    ``imagefolder:PATH`` with PATH relative to the server's datasets folder or under an allowed
    root) or ``upload`` when a dataset archive is attached.
    """

    config: CompressionConfig
    weights_uri: str | None = Field(
        None,
        max_length=1024,
        description="Weights already on the server: a path relative to the storage root, "
        "optionally written storage://PATH, inside a folder the operator shares or "
        "uploads/<job id>/weights.bin of one of your own queued or running jobs. Exclusive "
        "with an uploaded weights file.",
        examples=["models/resnet18-digits.safetensors"],
    )
    notify: NotifyTarget | None = Field(
        None, description="A webhook called when the job ends (README, Webhooks)."
    )


UPLOAD_DATASET = "upload"


def _time(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, tz=timezone.utc) if ts is not None else None


class NotifyView(_Body):
    """A job's webhook target as shown back: the URL, never the secret."""

    url: str


class JobView(_Body):
    """A job as clients see it (``GET /v1/jobs/{id}``)."""

    id: str
    state: JobState
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    percent: float = Field(0.0, description="0 to 100, rising while the job runs.")
    macs: int | None = Field(None, description="Current MACs of the model being compressed.")
    top1: float | None = Field(None, description="Current validation top-1, percent.")
    message: str = ""
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested: bool = False
    attempts: int = 0
    error: JobError | None = None
    result: dict[str, float | bool] | None = Field(
        None,
        description="Headline numbers of a succeeded job and its verdict target_met (false: "
        "published although the MACs target was missed within the accuracy budget).",
    )
    config: CompressionConfig
    weights_sha256: str | None = None
    dataset_sha256: str | None = None
    expired_at: datetime | None = Field(
        None, description="When its files were removed; its downloads then answer 410."
    )
    expired_reason: str | None = Field(
        None, description="'retention' (its time passed) or 'deleted' (its owner deleted them)."
    )
    notify: NotifyView | None = None
    delivery: WebhookDelivery | None = Field(
        None, description="The webhook delivery of the job's end: attempts, last answer."
    )
    links: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def of(cls, rec: JobRecord) -> JobView:
        base = f"/v1/jobs/{rec.id}"
        links = {"self": base}
        if rec.state is JobState.succeeded and rec.expired_at is None:
            links |= {"report": f"{base}/report", "artifacts": f"{base}/artifacts"}
        return cls(
            id=rec.id,
            state=rec.state,
            stage=rec.stage,
            step=rec.step,
            total_steps=rec.total_steps,
            percent=rec.percent,
            macs=rec.macs,
            top1=rec.top1,
            message=rec.message,
            created_at=_time(rec.created_at),  # type: ignore[arg-type]
            updated_at=_time(rec.updated_at),  # type: ignore[arg-type]
            started_at=_time(rec.started_at),
            finished_at=_time(rec.finished_at),
            cancel_requested=rec.cancel_requested,
            attempts=rec.attempts,
            error=rec.error,
            result=rec.result,
            config=rec.config,
            weights_sha256=rec.weights_sha256,
            dataset_sha256=rec.dataset_sha256,
            expired_at=_time(rec.expired_at),
            expired_reason=rec.expired_reason,
            notify=NotifyView(url=rec.notify.url) if rec.notify else None,
            delivery=rec.delivery,
            links=links,
        )


class JobList(_Body):
    items: list[JobView]
    total: int = Field(..., description="Jobs matching the filter, over all pages.")
    offset: int
    limit: int


class ArtifactView(_Body):
    name: str
    size: int
    sha256: str
    url: str


class ArtifactList(_Body):
    job_id: str
    files: list[ArtifactView]


class Health(_Body):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class QuotaLimits(_Body):
    max_active_jobs: int = Field(..., description="Queued plus running jobs (0: unlimited).")
    max_stored_bytes: int = Field(..., description="Stored bytes (0: unlimited).")


class UsageView(_Body):
    """``GET /v1/usage``: the caller's usage and limits; for an admin key also every owner's
    (owner ids, never keys)."""

    usage: OwnerUsage
    limits: QuotaLimits
    owners: list[OwnerUsage] | None = Field(
        None, description="Every owner's usage; only for an admin key."
    )


class JobLogs(_Body):
    """A page of a job's log (``GET /v1/jobs/{id}/logs``)."""

    job_id: str
    items: list[LogLine]
    next_after: str | None = Field(
        None, description="Pass as ?after= to read the lines that follow (None: none yet)."
    )
