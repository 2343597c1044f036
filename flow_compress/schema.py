"""Result types of one compression: the report, its rows, and the progress events.

``CompressionReport`` is what ``report.json`` holds and what the service returns from
``GET /v1/jobs/{id}/report``. MACs are multiply-accumulates (the paper's "GFLOPs");
FLOPs = 2 x MACs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flow_compress.config import CompressionConfig

Stage = Literal["Baseline", "Filter Prune", "Layer Trunc", "Final Fine-Tune"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelMetrics(_Model):
    """Accuracy on the test split (touched once, for this report), cost and latency."""

    top1: float = Field(..., description="Top-1 accuracy on the test split, percent.")
    top5: float = Field(..., description="Top-5 accuracy on the test split, percent.")
    macs: int = Field(..., description="Multiply-accumulates for one input (FLOPs = 2 x MACs).")
    params: int
    latency_ms: dict[str, float] = Field(
        default_factory=dict, description="Median latency by '<runtime>@b<batch>'."
    )


class StepRecord(_Model):
    """One row of the compression-dynamics table (accuracy on the validation split)."""

    step: int
    stage: Stage
    macs: int
    params: int
    top1: float
    top5: float
    accepted: bool = True
    detail: str = ""


class LatencyRecord(_Model):
    runtime: str
    batch_size: int
    device: str
    dtype: str
    base_ms: float
    pruned_ms: float
    speedup: float


class ParityRecord(_Model):
    format: str
    max_abs_diff: float
    samples: int
    passed: bool


class QuantizedArtifact(_Model):
    """One quantized ONNX variant of the pruned model and its checks.

    ``agreement`` and ``max_abs_diff`` compare it with the FP32 pruned ONNX model on
    ``samples`` validation images (the pass/fail gate); ``top1``/``top5`` are on the test
    split, for the report only.
    """

    mode: str = Field(..., description="int8_static, int8_dynamic or fp16.")
    file: str = Field(..., description="Artifact file name, listed in manifest.json.")
    size_bytes: int
    agreement: float = Field(..., description="Top-1 agreement with FP32 ONNX, percent.")
    max_abs_diff: float = Field(..., description="Largest absolute logit difference.")
    samples: int
    min_agreement: float
    passed: bool
    top1: float = Field(..., description="Top-1 accuracy on the test split, percent.")
    top5: float
    calibration_samples: int | None = Field(
        None, description="Validation images that calibrated activations (int8_static)."
    )
    latency_ms: dict[str, float] = Field(
        default_factory=dict, description="Median ONNX Runtime latency by '<device>@b<batch>'."
    )


class CombinationRow(_Model):
    """One row of the paper-shaped combination table (pruning x quantization x distillation).

    Latencies are ONNX Runtime medians by '<device>@b<batch>' ('cpu@b1', 'cuda@b32'), every
    row timed in the same process as the baseline; ``speedup`` divides the baseline's by this
    row's. MACs do not change with precision.
    """

    variant: str
    precision: str = Field(..., description="fp32, int8 or fp16.")
    distillation: str | None = Field(None, description="Recovery loss of a pruned row.")
    file: str | None = Field(None, description="Artifact the row measures, if published.")
    macs: int
    top1: float = Field(..., description="Top-1 accuracy on the test split, percent.")
    top5: float
    size_bytes: int = Field(..., description="ONNX file size on disk.")
    latency_ms: dict[str, float] = Field(default_factory=dict)
    speedup: dict[str, float] = Field(default_factory=dict)


class Guarantee(_Model):
    """The paper's bound ||N0(x) - N*(x)||^2 <= dmax ||N0(x)||^2, checked on validation data."""

    delta_p99: float = Field(..., description="99th percentile of the relative squared error.")
    delta_max: float


class CompressionReport(_Model):
    schema_version: int = 1
    model: str
    dataset: str
    config: CompressionConfig
    base: ModelMetrics
    pruned: ModelMetrics
    macs_ratio: float = Field(..., description="Pruned MACs / base MACs.")
    params_ratio: float
    top1_drop: float = Field(..., description="Base minus pruned test top-1, points.")
    speedup: float | None = Field(None, description="Headline speed-up, see speedup_runtime.")
    speedup_runtime: str | None = None
    latency: list[LatencyRecord] = Field(default_factory=list)
    steps: list[StepRecord]
    recovery_iterations: dict[str, int] = Field(
        default_factory=dict, description="Optimisation steps spent per stage."
    )
    guarantee: Guarantee | None = None
    parity: list[ParityRecord] = Field(default_factory=list)
    quantized: list[QuantizedArtifact] = Field(
        default_factory=list, description="Quantized ONNX variants (quantize.modes)."
    )
    combination: list[CombinationRow] = Field(
        default_factory=list,
        description="Baseline, pruned and quantized variants side by side (paper's table).",
    )
    timings_s: dict[str, float] = Field(default_factory=dict)
    environment: dict[str, str] = Field(default_factory=dict)
    splits: dict[str, int] = Field(default_factory=dict)
    weights_sha256: str | None = None
    notes: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class ProgressEvent:
    """Emitted at every step boundary; ``percent`` rises monotonically from 0 to 100."""

    stage: str
    step: int
    total_steps: int
    percent: float
    macs: int | None = None
    top1: float | None = None
    message: str = ""


__all__ = [
    "CombinationRow",
    "CompressionReport",
    "Guarantee",
    "LatencyRecord",
    "ModelMetrics",
    "ParityRecord",
    "ProgressEvent",
    "QuantizedArtifact",
    "Stage",
    "StepRecord",
]
