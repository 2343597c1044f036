"""Configuration of one compression: frozen pydantic models, ``extra="forbid"``.

The same models are embedded in the service's HTTP schemas and in the worker's task message,
so the OpenAPI spec, the queue payload and the library input cannot drift.

Names of plug-ins (``prune.criterion``, ``export.formats``, ``latency.runtimes``,
``quantize.modes``) are checked against their registries (``flow_compress.criteria``,
``flow_compress.export``), which are torch-free; the JSON schema lists the names registered
when it is generated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from flow_compress.contract import Normalization
from flow_compress.criteria import list_criteria
from flow_compress.export import list_exporters, list_quantizers, list_runtimes

Schedule = Literal["decay", "paper"]
Ranking = Literal["score", "score_per_mac", "score_per_ms", "auto"]
Distillation = Literal["kd", "kd_features", "none"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
OnTargetMissed = Literal["publish", "fail"]


def _registered(kind: str, names: Callable[[], list[str]]) -> Any:
    """A ``str`` that must name a registered ``kind``; the error lists the valid names."""

    def check(value: str) -> str:
        valid = names()
        if value not in valid:
            raise ValueError(f"unknown {kind} {value!r}; registered: {', '.join(valid)}")
        return value

    return Annotated[
        str,
        AfterValidator(check),
        Field(json_schema_extra=lambda schema: schema.update(enum=names())),
    ]


CriterionName = _registered("criterion", list_criteria)
ExportFormat = _registered("export format", list_exporters)
Runtime = _registered("runtime", list_runtimes)
QuantizeMode = _registered("quantization mode", list_quantizers)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PruneConfig(_Frozen):
    """Stage 1: divergence-aware filter pruning.

    ``criterion`` names a registered criterion (``flow_compress.criteria``): ``divergence``
    (IDAP++) or a baseline such as torch-pruning's L1 magnitude, Taylor or random importance.
    It swaps only the per-unit score and keeps the schedule, caps, recovery and budget
    identical, so baselines differ from IDAP++ in the criterion alone.
    """

    enabled: bool = True
    steps: int = Field(8, ge=1, le=100, description="K, the number of pruning steps.")
    schedule: Schedule = "decay"
    paper_alpha: float = Field(1.5, gt=0, le=10)
    paper_beta: float = Field(0.10, gt=0, lt=1)
    criterion: CriterionName = "divergence"
    ranking: Ranking = Field(
        "score",
        description=(
            "Global order of removal: lowest score first (the paper's, and the default: it "
            "measured best in bench/quality), lowest score per MAC saved, lowest score per "
            "millisecond saved on the deployment (measured cost model; the default when a "
            "latency target is given), or auto (score and score_per_mac each step, keep the "
            "better on calibration data before recovery)."
        ),
    )
    consumer_weighting: bool = Field(
        False, description="Multiply group scores by the consumers' normalised input norms."
    )
    max_layer_ratio: float = Field(0.9, gt=0, lt=1)
    min_channels: int = Field(4, ge=1, le=4096)
    round_to: int | None = Field(None, ge=1, le=256)
    retries: int = Field(2, ge=0, le=5, description="Rollbacks with a halved ratio per step.")
    calibration_batches: int = Field(4, ge=1, le=1000)


class TruncateConfig(_Frozen):
    """Stage 2: flow-guided layer truncation."""

    enabled: bool = True
    tau: float = Field(
        0.5, ge=0, le=100, description="Max validation error rise per removal, points."
    )
    max_layers: int = Field(3, ge=0, le=256)
    n_try: int = Field(3, ge=1, le=64, description="Candidates tried per round before giving up.")
    allow_projection: bool = Field(
        False, description="Replace shape-changing blocks by their projection shortcut."
    )
    calibration_batches: int = Field(4, ge=1, le=1000)


class RecoveryConfig(_Frozen):
    """Recovery between steps and the final fine-tune: distillation from the original model."""

    distillation: Distillation = "kd"
    feature_taps: tuple[str, ...] = Field(
        (),
        max_length=64,
        description="Module paths matched between student and teacher for kd_features.",
    )
    feature_weight: float = Field(1.0, ge=0, le=1000)
    temperature: float = Field(4.0, gt=0, le=100)
    kd_weight: float = Field(0.7, ge=0, le=1, description="Weight of the KL term; CE gets 1-w.")
    iters_per_step: int = Field(
        150, ge=0, le=100_000, description="Optimisation steps after each prune step."
    )
    trunc_iters: int = Field(
        100, ge=0, le=100_000, description="Optimisation steps after each truncation."
    )
    final_iters: int = Field(
        600, ge=0, le=1_000_000, description="Optimisation steps of the final fine-tune."
    )
    lr: float = Field(0.01, gt=0, le=10)
    final_lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    batch_size: int = Field(128, ge=1, le=4096)
    amp: bool = Field(True, description="Mixed precision when the device is CUDA.")


class DataConfig(_Frozen):
    """How the dataset reference is split and fed.

    ``normalization`` chooses the preprocessing the model is fed with (and which the input
    contract of every artifact states, ``flow_compress.contract``): ``default`` (ImageNet
    mean/std for three channels, 0.5/0.25 per channel otherwise, bilinear resize, no crop) or
    ``pretrained`` (the architecture's published preprocessing: timm's ``pretrained_cfg``
    mean/std/interpolation/crop_pct, torchvision's default weights' transforms);
    ``custom_normalization`` gives explicit values instead (with ``default``). It must be what
    the weights were trained with.
    """

    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_train_samples: int | None = Field(None, ge=1, le=100_000_000)
    max_eval_samples: int | None = Field(None, ge=1, le=100_000_000)
    eval_batch_size: int = Field(256, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)
    augment: bool = True
    download: bool = False
    normalization: Literal["default", "pretrained"] = Field(
        "default",
        description="default, or pretrained: the architecture's published preprocessing "
        "(timm pretrained_cfg, torchvision weights' transforms).",
    )
    custom_normalization: Normalization | None = Field(
        None,
        description="Explicit {mean, std, interpolation, crop_pct} instead of the default "
        "(an unset mean or std keeps the default's).",
    )

    @model_validator(mode="after")
    def _one_normalization(self) -> DataConfig:
        if self.custom_normalization is not None and self.normalization == "pretrained":
            raise ValueError(
                "data.custom_normalization and data.normalization=pretrained exclude each other"
            )
        return self


class ExportConfig(_Frozen):
    formats: tuple[ExportFormat, ...] = Field(("torchscript", "onnx"), max_length=8)
    onnx_opset: int = Field(17, ge=11, le=23)
    parity_atol: float = Field(
        1e-3, gt=0, le=10, description="Max abs diff allowed vs eager logits."
    )
    # Why a relative part: float32 re-association across a deep graph moves logits by a few
    # ulps of their magnitude, so a fixed atol fails a correct export of a model whose logits
    # are large (a random-init MNASNet whose BN statistics blew up after pruning: logits
    # ~7.7e9, diff 1.0e4 = 1.3e-6 relative).
    parity_rtol: float = Field(
        1e-5,
        ge=0,
        le=0.1,
        description="Added tolerance, relative to the largest absolute eager logit.",
    )
    parity_samples: int = Field(64, ge=1, le=10_000)
    embed_preprocessing: bool = Field(
        False,
        description=(
            "Also publish model.raw.onnx: the ONNX model with the input contract's "
            "preprocessing in its graph, taking raw uint8 NHWC images already resized (and "
            "cropped) to the input size. Requires 'onnx' in formats."
        ),
    )

    def parity_tolerance(self, scale: float) -> float:
        """The largest max-abs logit difference accepted when the eager logits' largest
        absolute value is ``scale``: ``parity_atol + parity_rtol * scale``."""
        return self.parity_atol + self.parity_rtol * scale


class LatencyConfig(_Frozen):
    enabled: bool = True
    batch_sizes: tuple[Annotated[int, Field(ge=1, le=1024)], ...] = Field((1, 32), max_length=8)
    runtimes: tuple[Runtime, ...] = Field(("eager", "torchscript", "onnxruntime"), max_length=8)
    warmup: int = Field(10, ge=0, le=10_000)
    runs: int = Field(50, ge=1, le=10_000)
    threads: int | None = Field(None, ge=1, le=256)


class DeploymentConfig(_Frozen):
    """Where the pruned model will run: the runtime, device and batch a latency target
    (``target_latency_ms``, ``target_speedup``) is measured on, and the cost model is built
    for.

    ``runtime`` is a registered latency runtime (``eager``, ``torchscript``, ``onnxruntime``).
    ``device`` ``cuda`` runs torch on the GPU and ONNX Runtime with its CUDA execution
    provider, or its TensorRT provider with ``provider="tensorrt"``. A deployment this machine
    cannot run (no GPU, no such provider, float16 on a CPU) is refused with
    ``deployment_unavailable`` before any work starts. ``fp16`` is float16 weights and
    compute (CUDA only). ``threads`` fixes the intra-op threads of torch and ONNX Runtime
    (None: the runtime's default), as the serving process would.
    """

    runtime: Runtime = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    provider: Literal["default", "tensorrt"] = Field(
        "default", description="ONNX Runtime on CUDA: its CUDA provider, or TensorRT's."
    )
    batch_size: int = Field(1, ge=1, le=1024)
    threads: int | None = Field(None, ge=1, le=256)
    dtype: Literal["fp32", "fp16"] = "fp32"
    warmup: int = Field(5, ge=0, le=1000, description="Untimed runs before each measurement.")
    runs: int = Field(
        25, ge=3, le=10_000, description="Timed runs per end-to-end measurement (median)."
    )
    min_agreement: float = Field(
        99.0,
        ge=0,
        le=100,
        description="Least top-1 agreement (percent of export.parity_samples validation "
        "images) of the pruned model on the deployment with eager float32 on the CPU; below "
        "it the job fails with export_parity_failed.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentConfig:
        if self.provider == "tensorrt" and (self.runtime != "onnxruntime" or self.device != "cuda"):
            raise ValueError(
                "deployment.provider=tensorrt is ONNX Runtime's TensorRT execution provider: "
                "it needs runtime=onnxruntime and device=cuda"
            )
        if self.dtype == "fp16" and self.device != "cuda":
            raise ValueError("deployment.dtype=fp16 needs device=cuda (CPUs run float16 slowly)")
        return self

    def refusal(self, cuda: bool, providers: Sequence[str]) -> str | None:
        """Why a machine cannot run this deployment (None: it can), given whether torch sees
        a CUDA GPU there and ONNX Runtime's execution providers there. The one rule the
        library (before a run) and the service (at submission, against the workers'
        published capabilities) both apply."""
        if self.device == "cuda" and not cuda:
            return f"deployment {self.label()} needs a CUDA GPU and none is visible to torch"
        if self.runtime == "onnxruntime" and self.device == "cuda":
            want = (
                "TensorrtExecutionProvider"
                if self.provider == "tensorrt"
                else "CUDAExecutionProvider"
            )
            if want not in providers:
                return (
                    f"deployment {self.label()} needs ONNX Runtime's {want}; the installation "
                    f"has {', '.join(providers) or 'no providers'} (install onnxruntime-gpu"
                    + (" built with TensorRT" if self.provider == "tensorrt" else "")
                    + ")"
                )
        return None

    def label(self) -> str:
        """``onnxruntime/cpu/b1/fp32/2t``: the deployment in reports and cache keys."""
        provider = "" if self.provider == "default" else f"+{self.provider}"
        threads = f"/{self.threads}t" if self.threads else ""
        return f"{self.runtime}{provider}/{self.device}/b{self.batch_size}/{self.dtype}{threads}"


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
        (), max_length=8, description="Quantized variants to build; empty means no quantization."
    )
    calibration_samples: int = Field(
        512,
        ge=1,
        le=100_000,
        description="Validation images that calibrate int8_static activations.",
    )
    calibration_batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="Images per calibration batch (a remainder batch is dropped).",
    )
    calibration_method: CalibrationMethod = "minmax"
    per_channel: bool = Field(True, description="One weight scale per output channel.")
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="int8_static activations; ONNX Runtime's x86 kernels prefer uint8."
    )
    reduce_range: bool | None = Field(
        None,
        description=(
            "7-bit weights, so the uint8 x int8 products of ONNX Runtime's integer kernels on "
            "x86 CPUs without VNNI (AVX2 only) cannot saturate their int16 sums. None: on for "
            "int8_static, off for int8_dynamic (README, Quantization, has the measurements)."
        ),
    )
    keep_classifier_fp32: bool = Field(
        True,
        description=(
            "Leave the layer producing the logits unquantized: its output range is wide and "
            "8 bits flip the top-1 class of low-margin inputs, for a negligible share of MACs."
        ),
    )
    parity_samples: int = Field(
        512, ge=1, le=100_000, description="Validation images of the checks."
    )
    min_agreement: float = Field(
        97.0, ge=0, le=100, description="Top-1 agreement with the FP32 ONNX model, percent."
    )

    @model_validator(mode="after")
    def _distinct(self) -> QuantizeConfig:
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"quantize.modes lists a mode twice: {list(self.modes)}")
        return self


class GuaranteeConfig(_Frozen):
    """The output bound ‖N₀(x) − N*(x)‖² ≤ Δmax · ‖N₀(x)‖² between the base (N₀) and pruned
    (N*) logits, checked on the validation split (docs/algorithm.md, "Guarantee").

    The check compares the 99th percentile of the relative squared error over validation
    inputs with ``delta_max``; the report says whether the bound holds or is exceeded. The
    default 0.25 (the error's norm at most half the logits' norm on 99 % of inputs) held on
    every run of this project's benchmarks that stayed within about 2 top-1 points of its base
    model, and was exceeded by those that lost 2.7 points or more or recovered without
    distillation. ``enforce`` makes an exceeded bound fail the job (``guarantee_exceeded``,
    nothing published) instead of only reporting it.
    """

    delta_max: float = Field(
        0.25, gt=0, le=100, description="Δmax: tolerated relative squared error."
    )
    enforce: bool = Field(False, description="Fail the job when the bound is exceeded.")


class CompressionConfig(_Frozen):
    """One compression job: model, data, target, budget and every stage's options."""

    model: str = Field(
        ...,
        max_length=200,
        description=(
            "Model reference: a registered name (resnet18), timm:NAME, torchvision:NAME, or "
            "hf-hub:ORG/NAME (a timm model in the worker's local Hugging Face cache)."
        ),
    )
    dataset: str = Field(
        ..., max_length=4096, description="Dataset reference, e.g. fashion-mnist or digits."
    )
    pretrained: bool = Field(
        False,
        description=(
            "Start from the source's published weights, read from the local caches "
            "(weights_not_available when they are not there; nothing is downloaded)."
        ),
    )
    num_classes: int | None = Field(
        None, ge=2, le=100_000, description="Defaults to the dataset's."
    )
    in_chans: int = Field(3, ge=1, le=4)
    input_size: int | None = Field(None, ge=8, le=640, description="Defaults to the model's.")
    target_macs: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "Fraction of the base model's MACs to keep. Defaults to 0.3 when no latency "
            "target is given; with one, None means no MACs target."
        ),
    )
    target_latency_ms: float | None = Field(
        None,
        gt=0,
        le=600_000,
        description="Median latency to reach on the deployment, milliseconds per batch.",
    )
    target_speedup: float | None = Field(
        None,
        gt=1,
        le=1000,
        description="Speed-up over the base model to reach on the deployment (base / pruned).",
    )
    deployment: DeploymentConfig | None = Field(
        None,
        description=(
            "The runtime a latency target is measured on; a latency target without one uses "
            "the defaults (ONNX Runtime, CPU, batch 1, fp32). Given without a target, every "
            "step is still timed on it and the report states the speed-up there."
        ),
    )
    max_drop: float = Field(1.5, ge=0, le=100, description="Accuracy budget, top-1 points.")
    on_target_missed: OnTargetMissed = Field(
        "publish",
        description=(
            "When a target (MACs, latency) is not reached within the accuracy budget: publish "
            "the best model reached (report.target_met is false) or fail with "
            "budget_exceeded."
        ),
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    prune: PruneConfig = PruneConfig()
    truncate: TruncateConfig = TruncateConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    data: DataConfig = DataConfig()
    export: ExportConfig = ExportConfig()
    latency: LatencyConfig = LatencyConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    guarantee: GuaranteeConfig = GuaranteeConfig()

    @model_validator(mode="before")
    @classmethod
    def _targets(cls, data: Any) -> Any:
        """The defaults a latency target changes: no MACs target unless one is given, the
        deployment's defaults, and ranking by score per millisecond unless one is chosen."""
        if not isinstance(data, dict):
            return data
        latency = (
            data.get("target_latency_ms") is not None or data.get("target_speedup") is not None
        )
        data = dict(data)
        if not latency:
            if data.get("target_macs") is None:
                data["target_macs"] = 0.3
            return data
        if data.get("deployment") is None:
            data["deployment"] = {}
        prune = data.get("prune")
        if prune is None:
            data["prune"] = {"ranking": "score_per_ms"}
        elif isinstance(prune, dict) and "ranking" not in prune:
            data["prune"] = {**prune, "ranking": "score_per_ms"}
        elif isinstance(prune, PruneConfig) and "ranking" not in prune.model_fields_set:
            data["prune"] = prune.model_copy(update={"ranking": "score_per_ms"})
        return data

    @property
    def has_latency_target(self) -> bool:
        return self.target_latency_ms is not None or self.target_speedup is not None

    @model_validator(mode="after")
    def _check(self) -> CompressionConfig:
        if self.prune.ranking == "score_per_ms" and self.deployment is None:
            raise ValueError(
                "prune.ranking=score_per_ms ranks by milliseconds saved on a deployment: give "
                "deployment (or a latency target)"
            )
        if self.recovery.distillation == "kd_features" and not self.recovery.feature_taps:
            raise ValueError("recovery.feature_taps is required with distillation=kd_features")
        _normalization_fits(self.data, self.in_chans)
        if self.export.embed_preprocessing and "onnx" not in self.export.formats:
            raise ValueError(
                "export.embed_preprocessing needs the ONNX export: add 'onnx' to export.formats"
            )
        if self.quantize.modes and "onnx" not in self.export.formats:
            raise ValueError(
                "quantize.modes needs the ONNX export: add 'onnx' to export.formats "
                "(the quantized models are made from and checked against model.onnx)"
            )
        return self


def _normalization_fits(data: DataConfig, in_chans: int) -> None:
    """An explicit ``data.custom_normalization`` must fit the model's channels."""
    if data.custom_normalization is not None:
        try:
            data.custom_normalization.for_channels(in_chans)
        except ValueError as exc:
            raise ValueError(f"data.custom_normalization: {exc}") from exc


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for ``dotted == "a.b"`` in a raw config dict (what the
    command lines build before validating it), creating missing levels. Raises ``ValueError``
    when an intermediate key holds something other than a dict."""
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"{dotted}: {key} is not an object")
        node = child
    node[keys[-1]] = value


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
    seed: int = Field(0, ge=0, le=2**32 - 1)
    amp: bool = True
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        _normalization_fits(self.data, self.in_chans)
        return self


__all__ = [
    "CompressionConfig",
    "DataConfig",
    "DeploymentConfig",
    "ExportConfig",
    "GuaranteeConfig",
    "LatencyConfig",
    "PruneConfig",
    "QuantizeConfig",
    "RecoveryConfig",
    "TrainConfig",
    "TruncateConfig",
    "set_dotted",
]
