"""Result types of one compression: the report, its rows, and the progress events.

``CompressionReport`` is what ``report.json`` holds and what the service returns from
``GET /v1/jobs/{id}/report``. MACs are multiply-accumulates (the paper's "GFLOPs");
FLOPs = 2 x MACs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from flow_compress.config import CompressionConfig
from flow_compress.contract import InputContract

# The MACs target counts as reached within 1 %: channel rounding and coupled groups make an
# exact landing impossible, and stage 1 stops there.
TARGET_SLACK = 1.01


class Stage(str, Enum):
    """The stages of a run, in order (``str`` values: they compare equal to, and serialise as,
    their text). Step records belong to the first four; ``EXPORT`` (evaluation, export,
    timing, publication) appears in progress events only."""

    BASELINE = "Baseline"
    FILTER_PRUNE = "Filter Prune"
    LAYER_TRUNC = "Layer Trunc"
    FINAL_FINE_TUNE = "Final Fine-Tune"
    EXPORT = "Export"

    def __str__(self) -> str:
        return self.value


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
    latency_ms: float | None = Field(
        None,
        description="Latency on the deployment (None: no deployment): the baseline's median "
        "over the speed-up against the base measured alternately at this step, so rows "
        "compare however loaded the machine was at each.",
    )
    predicted_latency_ms: float | None = Field(
        None,
        description="What the cost model predicted for this step before it was measured "
        "(stage-1 steps ranked by score_per_ms).",
    )

    @field_validator("stage")
    @classmethod
    def _a_step_stage(cls, stage: Stage) -> Stage:
        if stage is Stage.EXPORT:
            raise ValueError("the Export stage records no steps")
        return stage


class LatencyRecord(_Model):
    runtime: str
    batch_size: int
    device: str
    dtype: str
    base_ms: float
    pruned_ms: float
    speedup: float


class ParityRecord(_Model):
    """``tolerance``: the difference that was accepted (``export.parity_atol`` plus
    ``export.parity_rtol`` times the largest eager logit); None in reports written before
    it was recorded."""

    format: str
    max_abs_diff: float
    samples: int
    passed: bool
    tolerance: float | None = None


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
    """The paper's bound ||N0(x) - N*(x)||^2 <= dmax ||N0(x)||^2, checked on validation data:
    the bound holds when the 99th percentile of the relative squared error is at most the
    configured tolerance ``delta_max`` (``guarantee.delta_max``)."""

    delta_p99: float = Field(..., description="99th percentile of the relative squared error.")
    delta_max: float = Field(..., description="Δmax, the tolerance the p99 is checked against.")
    holds: bool | None = Field(
        None,
        description="delta_p99 <= delta_max. None only in reports of schema version 1, whose "
        "delta_max was the largest error seen rather than a tolerance.",
    )

    @model_validator(mode="after")
    def _verdict_follows_the_numbers(self) -> Guarantee:
        if self.holds is not None and self.holds != (self.delta_p99 <= self.delta_max):
            raise ValueError(
                f"holds={self.holds} contradicts delta_p99={self.delta_p99} against "
                f"delta_max={self.delta_max}"
            )
        return self


class CostModelStats(_Model):
    """The measured latency cost model of a run (``graph.latency_cost``): how long building
    its table took, how many layer timings were measured or read from the on-disk table, and
    how far its predictions were from the end-to-end measurements of the stage-1 steps."""

    table_entries: int
    measured: int = Field(..., description="Layer shapes timed during this run.")
    reused: int = Field(..., description="Lookups answered by the table.")
    build_s: float = Field(..., description="Seconds spent timing layers in this run.")
    cache_file: str | None = None
    steps_checked: int = 0
    mean_abs_error_pct: float | None = Field(
        None, description="Mean |predicted - measured| / measured over the checked steps."
    )
    max_abs_error_pct: float | None = None


# A speed-up within this share of 1 (or within half the runs' spread, if wider) is noise.
SPEEDUP_NOISE = 0.02


def speedup_verdict(speedup: float, spread: float) -> str:
    """``faster``, ``slower`` or ``no faster`` (inside the measurement's noise): a pruned model
    is called faster only when its speed-up clears the noise."""
    margin = max(SPEEDUP_NOISE, spread / 2)
    if speedup >= 1 + margin:
        return "faster"
    if speedup <= 1 - margin:
        return "slower"
    return "no faster"


class DeploymentParity(_Model):
    """The pruned model as the deployment runs it (its runtime, device, dtype and batch size)
    against the eager float32 model on the CPU, on ``samples`` validation images. Top-1
    agreement is the criterion, not a logit tolerance: float16, TF32 and TensorRT's kernels
    move logits by more than float32 rounding without changing what the model predicts."""

    samples: int
    top1_agreement: float = Field(..., description="Percent of samples with the same top-1.")
    max_abs_diff: float
    min_agreement: float
    passed: bool

    @model_validator(mode="after")
    def _passed_follows_the_numbers(self) -> DeploymentParity:
        if self.passed != (self.top1_agreement >= self.min_agreement):
            raise ValueError("passed contradicts top1_agreement and min_agreement")
        return self


class DeploymentOutcome(_Model):
    """The speed-up on the deployment the job named, base and pruned timed alternately in one
    process (``measure.deployment``), and the latency target's verdict."""

    deployment: str = Field(..., description="runtime/device/batch/dtype[/threads].")
    runtime: str
    device: str = Field(..., description="The hardware that ran it.")
    batch_size: int
    dtype: str
    threads: int | None = None
    base_ms: float
    pruned_ms: float
    speedup: float
    spread: float = Field(
        ..., description="Wider interquartile range of the two models' runs, over the median."
    )
    verdict: str = Field(..., description="faster, no faster (within noise) or slower.")
    target_latency_ms: float | None = None
    target_speedup: float | None = None
    latency_target_met: bool | None = Field(
        None, description="Whether every latency target was met (None: none was given)."
    )
    cost_model: CostModelStats | None = None
    parity: DeploymentParity | None = Field(
        None, description="The pruned model on the deployment against eager float32 on the CPU."
    )

    @model_validator(mode="after")
    def _verdicts_follow_the_numbers(self) -> DeploymentOutcome:
        if self.verdict != speedup_verdict(self.speedup, self.spread):
            raise ValueError(f"verdict {self.verdict!r} contradicts speedup {self.speedup:.3f}")
        if self.latency_target_met is not None:
            met = (self.target_latency_ms is None or self.pruned_ms <= self.target_latency_ms) and (
                self.target_speedup is None or self.speedup >= self.target_speedup
            )
            if met != self.latency_target_met:
                raise ValueError("latency_target_met contradicts the measured latency")
        return self


class CompressionReport(_Model):
    """Everything one compression measured and decided.

    Schema version 2 added the verdicts ``target_met`` and ``guarantee.holds`` and the pruned
    weights' digest; reports of version 1 load with those fields None. Version 3 added
    ``input_contract`` (None in older reports). Version 4 added ``deployment`` (the speed-up
    on the job's deployment and the latency target's verdict) and per-step latencies.
    """

    schema_version: int = 4
    model: str
    dataset: str
    config: CompressionConfig
    base: ModelMetrics
    pruned: ModelMetrics
    macs_ratio: float = Field(..., description="Pruned MACs / base MACs.")
    target_met: bool | None = Field(
        None,
        description="Whether every target was met: macs_ratio against config.target_macs "
        "(within the 1 % stage 1 stops at) and the latency target on the deployment "
        "(deployment.latency_target_met). None only in reports of schema version 1.",
    )
    params_ratio: float
    top1_drop: float = Field(..., description="Base minus pruned test top-1, points.")
    speedup: float | None = Field(None, description="Headline speed-up, see speedup_runtime.")
    speedup_runtime: str | None = None
    latency: list[LatencyRecord] = Field(default_factory=list)
    deployment: DeploymentOutcome | None = Field(
        None, description="Speed-up on the job's deployment (config.deployment), if any."
    )
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
    weights_sha256: str | None = Field(
        None, description="sha256 of the input weights file (None: random initialisation)."
    )
    pruned_weights_sha256: str | None = Field(
        None,
        description="sha256 of the published weights.safetensors (as in manifest.json). None "
        "only in reports of schema version 1.",
    )
    input_contract: InputContract | None = Field(
        None,
        description="How an image is prepared for the exported models (the same contract as "
        "preprocessing.json and the models' metadata). None only in reports before version 3.",
    )
    notes: list[str] = Field(default_factory=list)

    @property
    def macs_target_met(self) -> bool | None:
        """The MACs target's own verdict. ``target_met`` also covers the latency target, so
        where that was missed the MACs verdict comes from the ratio, as stage 1 judged it;
        None without a MACs target or in reports of schema version 1."""
        target = self.config.target_macs
        if self.target_met is None or target is None:
            return None
        d = self.deployment
        if d is None or d.latency_target_met is not False:
            return self.target_met
        return self.macs_ratio <= target * TARGET_SLACK


@dataclass(frozen=True)
class ProgressEvent:
    """Emitted at every step boundary; ``percent`` rises monotonically from 0 to 100."""

    stage: Stage
    step: int
    total_steps: int
    percent: float
    macs: int | None = None
    top1: float | None = None
    message: str = ""


# --------------------------------------------------------------------------- preflight
# Torch-free, like the rest of this module: the API answers POST /v1/preflight with these.


class LeftAlone(_Model):
    """A conv or linear layer (or an opaque block) whose output channels stage 1 does not
    prune, and why."""

    layer: str
    type: str
    reason: str


class ExportProbe(_Model):
    """One export format of the unpruned model: written, reloaded and compared."""

    format: str
    passed: bool
    max_abs_diff: float | None = None
    error: str | None = None


class PreflightReport(_Model):
    """What a compression of a model would meet, found without data or training
    (``flow_compress.pipeline.preflight``). Fields an earlier failed check made unanswerable
    are None (``forward_error``, ``graph_error`` say why); ``ok`` sums it up."""

    model: str
    architecture: str
    family: str
    num_classes: int
    in_chans: int
    input_size: int
    weights: str = Field(description="fit, not_given or bad")
    weights_error: str | None = None
    forward_error: str | None = None
    failing_layer: str | None = None
    macs: int | None = None
    params: int | None = None
    graph_error: str | None = None
    prunable_groups: int = 0
    prunable_channels: int = 0
    prunable_heads: int = 0
    left_alone: list[LeftAlone] = []
    stage2_candidates: list[str] = []
    target_macs: float | None
    deployment_error: str | None = Field(
        None, description="Why this machine cannot run the job's deployment, if it cannot."
    )
    reachable_macs: int | None = None
    reachable_ratio: float | None = None
    target_reachable: bool | None = None
    exports: list[ExportProbe] = []
    seconds: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """Every check passed and the target is reachable."""
        return (
            self.weights != "bad"
            and self.forward_error is None
            and self.graph_error is None
            and bool(self.target_reachable)
            and self.deployment_error is None
            and all(e.passed for e in self.exports)
        )

    @model_validator(mode="before")
    @classmethod
    def _drop_ok(cls, data: object) -> object:
        # ``ok`` is derived; a report read back from JSON carries it and must still validate.
        if isinstance(data, dict) and "ok" in data:
            data = {k: v for k, v in data.items() if k != "ok"}
        return data


__all__ = [
    "TARGET_SLACK",
    "CombinationRow",
    "CompressionReport",
    "CostModelStats",
    "DeploymentOutcome",
    "DeploymentParity",
    "ExportProbe",
    "Guarantee",
    "LatencyRecord",
    "LeftAlone",
    "ModelMetrics",
    "ParityRecord",
    "PreflightReport",
    "ProgressEvent",
    "QuantizedArtifact",
    "Stage",
    "StepRecord",
    "speedup_verdict",
]
