"""Typed errors of the library.

Every error carries a stable snake_case ``code``; the service maps codes to HTTP statuses in one
place (``api.errors``) and the worker classifies them as permanent (user errors) or transient.
"""

from __future__ import annotations


class FlowCompressError(Exception):
    """Base class: ``code`` is stable and machine-readable, ``message`` is for people."""

    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidConfigError(FlowCompressError):
    """A configuration value is out of range or inconsistent."""

    code = "invalid_config"


class UnsupportedModelError(FlowCompressError):
    """The architecture name is unknown, or a layer type cannot be pruned/exported."""

    code = "unsupported_model"


class BadCheckpointError(FlowCompressError):
    """Weights cannot be read safely, or do not fit the architecture."""

    code = "bad_checkpoint"


class DatasetNotFoundError(FlowCompressError):
    """The dataset reference names data that is not on disk (and download was not allowed)."""

    code = "dataset_not_found"


class InvalidDatasetError(FlowCompressError):
    """The dataset reference cannot be parsed, or the data on disk is malformed."""

    code = "invalid_dataset"


class BudgetExceededError(FlowCompressError):
    """The accuracy budget was blown before any compression could be accepted."""

    code = "budget_exceeded"


class ExportParityError(FlowCompressError):
    """An exported model disagrees with the eager model beyond tolerance."""

    code = "export_parity_failed"


class ExportError(FlowCompressError):
    """An exporter failed (the message names the format and the cause)."""

    code = "export_failed"


class QuantizationError(FlowCompressError):
    """ONNX Runtime's quantization or float16 tools failed on the exported model."""

    code = "quantization_failed"


class QuantizationParityError(FlowCompressError):
    """A quantized model disagrees with the FP32 model beyond ``quantize.min_agreement``."""

    code = "quantization_parity_failed"


class CancelledError(FlowCompressError):
    """The caller's cancel check asked the pipeline to stop between steps."""

    code = "cancelled"


__all__ = [
    "BadCheckpointError",
    "BudgetExceededError",
    "CancelledError",
    "DatasetNotFoundError",
    "ExportError",
    "ExportParityError",
    "FlowCompressError",
    "InvalidConfigError",
    "InvalidDatasetError",
    "QuantizationError",
    "QuantizationParityError",
    "UnsupportedModelError",
]
