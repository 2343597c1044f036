"""Configuration of one compression: frozen pydantic models, ``extra="forbid"``.

The same models are embedded in the service's HTTP schemas and in the worker's task message,
so the OpenAPI spec, the queue payload and the library input cannot drift.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Schedule = Literal["decay", "paper"]
Criterion = Literal["divergence", "l1", "taylor", "random"]
Ranking = Literal["score", "score_per_mac", "auto"]
Distillation = Literal["kd", "kd_features", "none"]
ExportFormat = Literal["torchscript", "onnx"]
Runtime = Literal["eager", "torchscript", "onnxruntime"]
QuantizeMode = Literal["int8_static", "int8_dynamic", "fp16"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PruneConfig(_Frozen):
    """Stage 1: divergence-aware filter pruning.

    ``criterion`` other than ``divergence`` swaps only the per-channel score (torch-pruning's
    L1 magnitude, Taylor or random importance) and keeps the schedule, caps, recovery and
    budget identical, so baselines differ from IDAP++ in the criterion alone.
    """

    enabled: bool = True
    steps: int = Field(8, ge=1, le=100, description="K, the number of pruning steps.")
    schedule: Schedule = "decay"
    paper_alpha: float = Field(1.5, gt=0)
    paper_beta: float = Field(0.10, gt=0, lt=1)
    criterion: Criterion = "divergence"
    ranking: Ranking = Field(
        "score",
        description=(
            "Global order of removal: lowest score first (the paper's, and the default: it "
            "measured best in bench/quality), lowest score per MAC saved, or auto (both each "
            "step, keep the better on calibration data before recovery)."
        ),
    )
    consumer_weighting: bool = Field(
        False, description="Multiply group scores by the consumers' normalised input norms."
    )
    max_layer_ratio: float = Field(0.9, gt=0, lt=1)
    min_channels: int = Field(4, ge=1)
    round_to: int | None = Field(None, ge=1)
    retries: int = Field(2, ge=0, le=5, description="Rollbacks with a halved ratio per step.")
    calibration_batches: int = Field(4, ge=1)


class TruncateConfig(_Frozen):
    """Stage 2: flow-guided layer truncation."""

    enabled: bool = True
    tau: float = Field(0.5, ge=0, description="Max validation error rise per removal, points.")
    max_layers: int = Field(3, ge=0)
    n_try: int = Field(3, ge=1, description="Candidates tried per round before giving up.")
    allow_projection: bool = Field(
        False, description="Replace shape-changing blocks by their projection shortcut."
    )
    calibration_batches: int = Field(4, ge=1)


class RecoveryConfig(_Frozen):
    """Recovery between steps and the final fine-tune: distillation from the original model."""

    distillation: Distillation = "kd"
    feature_taps: tuple[str, ...] = Field(
        (), description="Module paths matched between student and teacher for kd_features."
    )
    feature_weight: float = Field(1.0, ge=0)
    temperature: float = Field(4.0, gt=0)
    kd_weight: float = Field(0.7, ge=0, le=1, description="Weight of the KL term; CE gets 1-w.")
    iters_per_step: int = Field(150, ge=0, description="Optimisation steps after each prune step.")
    trunc_iters: int = Field(100, ge=0, description="Optimisation steps after each truncation.")
    final_iters: int = Field(600, ge=0, description="Optimisation steps of the final fine-tune.")
    lr: float = Field(0.01, gt=0)
    final_lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    amp: bool = Field(True, description="Mixed precision when the device is CUDA.")


class DataConfig(_Frozen):
    """How the dataset reference is split and fed."""

    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    augment: bool = True
    download: bool = False


class ExportConfig(_Frozen):
    formats: tuple[ExportFormat, ...] = ("torchscript", "onnx")
    onnx_opset: int = Field(17, ge=11, le=23)
    parity_atol: float = Field(1e-3, gt=0, description="Max abs diff allowed vs eager logits.")
    parity_samples: int = Field(64, ge=1)


class LatencyConfig(_Frozen):
    enabled: bool = True
    batch_sizes: tuple[int, ...] = (1, 32)
    runtimes: tuple[Runtime, ...] = ("eager", "torchscript", "onnxruntime")
    warmup: int = Field(10, ge=0)
    runs: int = Field(50, ge=1)
    threads: int | None = Field(None, ge=1)


class QuantizeConfig(_Frozen):
    """Optional quantized ONNX variants of the pruned model (off unless ``modes`` names some).

    ``int8_static``: QDQ format, per-channel INT8 weights, activations calibrated on
    ``calibration_samples`` images of the *validation* split (never the test split).
    ``int8_dynamic``: INT8 weights, activation ranges computed at run time.
    ``fp16``: float16 weights and compute, float32 input and output kept.
    Each variant must agree with the FP32 pruned ONNX model on the top-1 class of at least
    ``min_agreement`` percent of ``parity_samples`` validation images, else the job fails
    with ``quantization_parity_failed``. Requires ``"onnx"`` in ``export.formats``.
    """

    modes: tuple[QuantizeMode, ...] = Field(
        (), description="Quantized variants to build; empty means no quantization."
    )
    calibration_samples: int = Field(
        512, ge=1, description="Validation images that calibrate int8_static activations."
    )
    calibration_batch_size: int = Field(
        32, ge=1, description="Images per calibration batch (a remainder batch is dropped)."
    )
    calibration_method: CalibrationMethod = "minmax"
    per_channel: bool = Field(True, description="One weight scale per output channel.")
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="int8_static activations; ONNX Runtime's x86 kernels prefer uint8."
    )
    reduce_range: bool = Field(
        False, description="7-bit weights: avoids int16 saturation on x86 CPUs without VNNI."
    )
    keep_classifier_fp32: bool = Field(
        True,
        description=(
            "Leave the layer producing the logits unquantized: its output range is wide and "
            "8 bits flip the top-1 class of low-margin inputs, for a negligible share of MACs."
        ),
    )
    parity_samples: int = Field(512, ge=1, description="Validation images of the checks.")
    min_agreement: float = Field(
        97.0, ge=0, le=100, description="Top-1 agreement with the FP32 ONNX model, percent."
    )

    @model_validator(mode="after")
    def _distinct(self) -> QuantizeConfig:
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"quantize.modes lists a mode twice: {list(self.modes)}")
        return self


class CompressionConfig(_Frozen):
    """One compression job: model, data, target, budget and every stage's options."""

    model: str = Field(..., description="Registered architecture name, e.g. resnet18.")
    dataset: str = Field(..., description="Dataset reference, e.g. fashion-mnist or digits.")
    num_classes: int | None = Field(None, ge=2, description="Defaults to the dataset's.")
    in_chans: int = Field(3, ge=1, le=4)
    input_size: int | None = Field(None, ge=8, le=1024, description="Defaults to the model's.")
    target_macs: float = Field(
        0.3, gt=0, le=1, description="Fraction of the base model's MACs to keep."
    )
    max_drop: float = Field(1.5, ge=0, le=100, description="Accuracy budget, top-1 points.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    seed: int = 0
    prune: PruneConfig = PruneConfig()
    truncate: TruncateConfig = TruncateConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    data: DataConfig = DataConfig()
    export: ExportConfig = ExportConfig()
    latency: LatencyConfig = LatencyConfig()
    quantize: QuantizeConfig = QuantizeConfig()

    @model_validator(mode="after")
    def _check(self) -> CompressionConfig:
        if self.recovery.distillation == "kd_features" and not self.recovery.feature_taps:
            raise ValueError("recovery.feature_taps is required with distillation=kd_features")
        if self.quantize.modes and "onnx" not in self.export.formats:
            raise ValueError(
                "quantize.modes needs the ONNX export: add 'onnx' to export.formats "
                "(the quantized models are made from and checked against model.onnx)"
            )
        return self


class TrainConfig(_Frozen):
    """Training a base model here (``flow-compress train``)."""

    model: str
    dataset: str
    num_classes: int | None = Field(None, ge=2)
    in_chans: int = Field(3, ge=1, le=4)
    input_size: int | None = Field(None, ge=8, le=1024)
    epochs: float = Field(5, gt=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    pretrained: bool = False
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    seed: int = 0
    amp: bool = True
    data: DataConfig = DataConfig()


__all__ = [
    "CompressionConfig",
    "DataConfig",
    "ExportConfig",
    "LatencyConfig",
    "PruneConfig",
    "QuantizeConfig",
    "RecoveryConfig",
    "TrainConfig",
    "TruncateConfig",
]
