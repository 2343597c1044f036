"""Typed errors of the library.

Every error carries a stable snake_case ``code``; the service maps codes to HTTP statuses in one
place (``api.errors``) and the worker classifies them as permanent (user errors) or transient.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Every stable error code a job or a request can end with (``str`` values, so they
    compare equal to, and serialise as, their snake_case text; a misspelt member fails at
    import). ``api.errors`` maps each one to an HTTP status and refuses to start if one is
    missing."""

    INTERNAL_ERROR = "internal_error"
    INVALID_CONFIG = "invalid_config"
    UNSUPPORTED_MODEL = "unsupported_model"
    BAD_CHECKPOINT = "bad_checkpoint"
    WEIGHTS_NOT_AVAILABLE = "weights_not_available"
    DATASET_NOT_FOUND = "dataset_not_found"
    INVALID_DATASET = "invalid_dataset"
    BUDGET_EXCEEDED = "budget_exceeded"
    GUARANTEE_EXCEEDED = "guarantee_exceeded"
    EXPORT_PARITY_FAILED = "export_parity_failed"
    EXPORT_FAILED = "export_failed"
    QUANTIZATION_FAILED = "quantization_failed"
    QUANTIZATION_PARITY_FAILED = "quantization_parity_failed"
    DEPLOYMENT_UNAVAILABLE = "deployment_unavailable"
    INVALID_FID_INPUT = "invalid_fid_input"
    CANCELLED = "cancelled"
    # Raised around the library, by the worker that runs a job (``worker.errors.classify``).
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    ARTIFACT_CORRUPT = "artifact_corrupt"
    SERVICE_UNAVAILABLE = "service_unavailable"

    def __str__(self) -> str:
        return self.value


class FlowCompressError(Exception):
    """Base class: ``code`` is stable and machine-readable, ``message`` is for people."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidConfigError(FlowCompressError):
    """A configuration value is out of range or inconsistent."""

    code = ErrorCode.INVALID_CONFIG


class UnsupportedModelError(FlowCompressError):
    """The architecture name is unknown, or a layer type cannot be pruned/exported."""

    code = ErrorCode.UNSUPPORTED_MODEL


class BadCheckpointError(FlowCompressError):
    """Weights cannot be read safely, or do not fit the architecture."""

    code = ErrorCode.BAD_CHECKPOINT


class WeightsNotAvailableError(FlowCompressError):
    """Published weights were asked for (``pretrained``, an ``hf-hub:`` reference) but are not
    in the local caches the caller passed in; nothing is ever downloaded."""

    code = ErrorCode.WEIGHTS_NOT_AVAILABLE


class DatasetNotFoundError(FlowCompressError):
    """The dataset reference names data that is not on disk (and download was not allowed)."""

    code = ErrorCode.DATASET_NOT_FOUND


class InvalidDatasetError(FlowCompressError):
    """The dataset reference cannot be parsed, or the data on disk is malformed."""

    code = ErrorCode.INVALID_DATASET


class BudgetExceededError(FlowCompressError):
    """The MACs target was not reached within the accuracy budget and the configuration asks
    to fail then (``on_target_missed="fail"``)."""

    code = ErrorCode.BUDGET_EXCEEDED


class GuaranteeExceededError(FlowCompressError):
    """The output bound's validation p99 exceeds ``guarantee.delta_max`` and the
    configuration asks to fail then (``guarantee.enforce``)."""

    code = ErrorCode.GUARANTEE_EXCEEDED


class ExportParityError(FlowCompressError):
    """An exported model disagrees with the eager model beyond tolerance."""

    code = ErrorCode.EXPORT_PARITY_FAILED


class ExportError(FlowCompressError):
    """An exporter failed (the message names the format and the cause)."""

    code = ErrorCode.EXPORT_FAILED


class QuantizationError(FlowCompressError):
    """ONNX Runtime's quantization or float16 tools failed on the exported model."""

    code = ErrorCode.QUANTIZATION_FAILED


class QuantizationParityError(FlowCompressError):
    """A quantized model disagrees with the FP32 model beyond ``quantize.min_agreement``."""

    code = ErrorCode.QUANTIZATION_PARITY_FAILED


class DeploymentUnavailableError(FlowCompressError):
    """The deployment a latency target is measured on (``deployment``: runtime, device,
    provider, dtype) cannot run on this machine: no CUDA device, no such ONNX Runtime
    execution provider, or a dtype the device does not run. Raised before any work starts."""

    code = ErrorCode.DEPLOYMENT_UNAVAILABLE


class FidInputError(FlowCompressError):
    """FID cannot be computed from what was given: images that are not N×C×H×W in [0, 1]
    with 1 or 3 channels, feature statistics of different dimensions or extractors or of
    fewer than two samples, or a statistics file that is not one (``flow_compress.measure.fid``)."""

    code = ErrorCode.INVALID_FID_INPUT


class CancelledError(FlowCompressError):
    """The caller's cancel check asked the pipeline to stop between steps."""

    code = ErrorCode.CANCELLED


__all__ = [
    "BadCheckpointError",
    "BudgetExceededError",
    "CancelledError",
    "DatasetNotFoundError",
    "DeploymentUnavailableError",
    "ErrorCode",
    "ExportError",
    "ExportParityError",
    "FidInputError",
    "FlowCompressError",
    "GuaranteeExceededError",
    "InvalidConfigError",
    "InvalidDatasetError",
    "QuantizationError",
    "QuantizationParityError",
    "UnsupportedModelError",
    "WeightsNotAvailableError",
]
