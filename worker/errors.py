"""The one classification of job failures: permanent (fail now, with a code) or transient
(retry with backoff).

Library errors are the user's (bad weights, unknown dataset, blown budget...) and never
improve on a retry. Transient means the surroundings failed: Redis or the network went away.
A CUDA out-of-memory is permanent here: with one job per device the same job on the same
device fails the same way, so retrying would only delay the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.error import URLError

import redis
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from flow_compress.errors import ErrorCode, FlowCompressError
from worker.storage import ArtifactCorruptError

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    ConnectionError,  # builtin: resets, refusals, broken pipes
    TimeoutError,
    URLError,  # dataset or pretrained-weight downloads
)


@dataclass(frozen=True)
class Failure:
    code: ErrorCode
    message: str
    transient: bool


def classify(exc: BaseException) -> Failure:
    """Map any exception raised while running a job to a stable code and a retry decision."""
    if isinstance(exc, FlowCompressError):
        return Failure(exc.code, exc.message, transient=False)
    if isinstance(exc, (SoftTimeLimitExceeded, TimeLimitExceeded)):
        return Failure(ErrorCode.TIMEOUT, "the job ran past its time limit", transient=False)
    if isinstance(exc, ArtifactCorruptError):
        return Failure(ErrorCode.ARTIFACT_CORRUPT, str(exc), transient=False)
    if isinstance(exc, MemoryError) or (
        # torch.cuda.OutOfMemoryError, recognised by name so this module stays torch-free
        type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch")
    ):
        return Failure(ErrorCode.OUT_OF_MEMORY, f"out of memory: {str(exc)[:500]}", transient=False)
    if isinstance(exc, TRANSIENT_ERRORS):
        return Failure(
            ErrorCode.SERVICE_UNAVAILABLE, f"{type(exc).__name__}: {exc}", transient=True
        )
    return Failure(
        ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {str(exc)[:500]}", transient=False
    )
