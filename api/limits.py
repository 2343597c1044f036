"""What one request may make the service do: operator caps checked at submission.

Every config field has an upper bound of its own (``flow_compress.config``), but bounded
fields multiply: eight prune steps of 100,000 recovery iterations at batch 4,096 are each
legal. The operator caps a job's total optimisation steps and training images
(``FLOW_COMPRESS_MAX_JOB_STEPS``, ``FLOW_COMPRESS_MAX_JOB_IMAGES``); its wall time is capped
by the worker's time limits (``FLOW_COMPRESS_SOFT_TIME_LIMIT``). Dataset downloads are the
operator's decision too: refused unless the dataset is on ``FLOW_COMPRESS_DOWNLOAD_DATASETS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.errors import ApiError
from api.settings import ApiSettings
from flow_compress.config import CompressionConfig
from flow_compress.refs import parse_dataset_ref


@dataclass(frozen=True)
class JobCost:
    """Upper bounds of a job's work, from its config alone."""

    steps: int
    images: int


def job_cost(config: CompressionConfig) -> JobCost:
    """The most optimisation steps a job can run: every stage-1 step with all its rollbacks
    (``prune.retries``) recovering ``iters_per_step`` each, every stage-2 round trying
    ``n_try`` candidates recovering ``trunc_iters`` each, and the final fine-tune; each step
    reads one batch of ``recovery.batch_size`` training images."""
    rec = config.recovery
    stage1 = config.prune.steps * (config.prune.retries + 1) * rec.iters_per_step
    stage2 = config.truncate.max_layers * config.truncate.n_try * rec.trunc_iters
    steps = (stage1 if config.prune.enabled else 0) + (stage2 if config.truncate.enabled else 0)
    steps += rec.final_iters
    return JobCost(steps=steps, images=steps * rec.batch_size)


def check_job(config: CompressionConfig, settings: ApiSettings, config_field: str) -> None:
    """Refuse a job past the operator's caps (``job_too_large``) or asking for a download the
    operator did not allow (``download_not_allowed``)."""
    cost = job_cost(config)
    if cost.steps > settings.max_job_steps:
        raise ApiError(
            "job_too_large",
            f"this job may run up to {cost.steps} optimisation steps; this server allows "
            f"{settings.max_job_steps} (lower prune.steps, recovery.*_iters or "
            "truncate.max_layers)",
            field=f"{config_field}.recovery",
        )
    if cost.images > settings.max_job_images:
        raise ApiError(
            "job_too_large",
            f"this job may train on up to {cost.images} images; this server allows "
            f"{settings.max_job_images} (lower recovery.batch_size or the iterations)",
            field=f"{config_field}.recovery.batch_size",
        )
    if config.data.download:
        name = parse_dataset_ref(config.dataset).name if config.dataset != "upload" else None
        if name is None or name not in settings.download_datasets:
            allowed = ", ".join(settings.download_datasets) or "none"
            raise ApiError(
                "download_not_allowed",
                f"this server does not download {name or 'this dataset'} for a job "
                f"(downloads allowed: {allowed})",
                field=f"{config_field}.data.download",
            )
