"""``compress``: the library's entry point (the CLI and the worker call it), in four steps a
reader can follow top to bottom:

1. ``prepare``: resolve the architecture and the dataset, build the model and load the input
   weights (their sha256 identifies the run's checkpoints);
2. ``run_pipeline``: the IDAP++ stages on the model in memory (``pipeline.run``);
3. ``finalize``: the verdicts — MACs target met, output bound held — which fail the job when
   the configuration says so, then the test split (read once, here) and the plan;
4. ``publish``: export and check every artifact, quantize, time, write the report and the
   manifest into a scratch folder, and move it into place in one rename.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flow_compress.arch.models import (
    WeightCaches,
    build_model,
    load_weights,
    replace_classifier,
    resolve_model,
    resolve_normalization,
    save_weights,
)
from flow_compress.artifacts import atomic_write_text, sha256_file, write_manifest
from flow_compress.config import CompressionConfig, GuaranteeConfig
from flow_compress.contract import CONTRACT_FILE
from flow_compress.data import DataSplits, load_dataset
from flow_compress.errors import (
    BudgetExceededError,
    ExportParityError,
    GuaranteeExceededError,
    InvalidConfigError,
)
from flow_compress.export import get_exporter
from flow_compress.export.parity import export_model
from flow_compress.export.quantize import build_quantized, combination_table
from flow_compress.export.raw import RAW_FILE, check_raw_parity, write_raw_onnx
from flow_compress.measure.environment import environment
from flow_compress.measure.evaluate import evaluate, relative_output_error
from flow_compress.measure.latency import compare_latency
from flow_compress.pipeline.checkpoint import Checkpointer, fingerprint
from flow_compress.pipeline.context import CancelFn, Context, ProgressFn
from flow_compress.pipeline.run import CompressionResult, run_pipeline
from flow_compress.plan import Plan, rebuild
from flow_compress.refs import known_num_classes, parse_dataset_ref
from flow_compress.report import write_report
from flow_compress.schema import (
    CombinationRow,
    CompressionReport,
    CostModelStats,
    DeploymentOutcome,
    Guarantee,
    LatencyRecord,
    ModelMetrics,
    ParityRecord,
    QuantizedArtifact,
    Stage,
    speedup_verdict,
)

WEIGHTS_FILE = "weights.safetensors"
PLAN_FILE = "plan.json"


def compress(
    config: CompressionConfig,
    *,
    weights: str | Path | None,
    out_dir: str | Path,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    overwrite: bool = False,
    checkpoint_dir: str | Path | None = None,
    caches: WeightCaches | None = None,
    latency_cache: str | Path | None = None,
) -> CompressionReport:
    """Compress ``config.model`` loaded from ``weights`` and write every artifact to ``out_dir``.

    Artifacts: one file per ``export.formats`` (model.ts, model.onnx), weights.safetensors,
    plan.json, preprocessing.json (the input contract, also inside model.onnx's
    metadata_props, model.ts's extra files and the report), report.json, report.md, PNG
    plots, manifest.json, model.raw.onnx with ``export.embed_preprocessing``, and one checked
    file per ``quantize.modes`` (model.int8_static.onnx, ...). They are written to a scratch folder
    beside ``out_dir`` and moved into place only when all of them succeeded, so ``out_dir``
    never holds a half-written result. ``out_dir`` must not exist or be empty unless
    ``overwrite``. Raises ``FlowCompressError`` subclasses (stable ``code``s), among them
    ``BudgetExceededError`` when the MACs target is missed and ``on_target_missed`` is
    ``fail``, and ``GuaranteeExceededError`` when the output bound is exceeded and
    ``guarantee.enforce`` is set; nothing is published then.

    With ``checkpoint_dir``, every accepted step is checkpointed there and a later call with
    the same configuration, weights and folder continues from the last one (the report's
    notes say so); the caller removes the folder when it no longer needs it.

    ``caches`` are the local folders published weights are read from (``hf-hub:`` references,
    ``pretrained``); nothing is downloaded.

    ``latency_cache`` is the folder the latency cost model's layer tables live in, one file
    per deployment and machine (``graph.latency_cost.LatencyTable``); None keeps the table
    in memory for this run only.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InvalidConfigError(f"output folder {out} is not empty (pass overwrite)")
    job = prepare(config, weights, caches=caches)
    checkpoint = (
        Checkpointer(checkpoint_dir, fingerprint(config, job.weights_sha256))
        if checkpoint_dir is not None
        else None
    )
    result = run_pipeline(
        job.model,
        job.data,
        config,
        progress=progress,
        should_cancel=should_cancel,
        checkpoint=checkpoint,
        latency_cache=Path(latency_cache) if latency_cache is not None else None,
    )
    measured = finalize(job, result)
    return publish(job, result, measured, out, started)


# --------------------------------------------------------------------------- 1. prepare


@dataclass(frozen=True)
class Prepared:
    """The inputs of a run, resolved: the data splits, the model with the input weights
    loaded, its class count and input size, and what the report says about the input."""

    config: CompressionConfig
    data: DataSplits
    model: nn.Module
    num_classes: int
    input_size: int
    weights_sha256: str | None
    notes: tuple[str, ...]
    load_s: float
    # The name that rebuilds the model without caches (plan.json), and an hf-hub model's
    # pretrained_cfg (its normalisation, input size) as its config.json states it.
    architecture: str = ""
    pretrained_cfg: dict[str, object] | None = None


def prepare(
    config: CompressionConfig,
    weights: str | Path | None,
    *,
    caches: WeightCaches | None = None,
) -> Prepared:
    """Resolve ``config.model`` and ``config.dataset``, build the model and load ``weights``
    (an ``hf-hub:`` reference's own weights when None; the source's published weights with
    ``config.pretrained``; a random initialisation otherwise, with a note saying so)."""
    started = time.perf_counter()
    resolved = resolve_model(config.model, caches=caches)
    if config.pretrained and (weights is not None or resolved.weights is not None):
        raise InvalidConfigError("pretrained starts from published weights: give no weights")
    size = config.input_size or _hub_input_size(resolved.pretrained_cfg)
    size = size or resolved.spec.default_input_size
    ref = parse_dataset_ref(config.dataset)
    data = load_dataset(
        ref,
        input_size=size,
        in_chans=config.in_chans,
        config=config.data,
        normalization=resolve_normalization(resolved.spec, config.data, resolved.pretrained_cfg),
    )
    num_classes = config.num_classes or known_num_classes(ref) or data.num_classes
    if num_classes != data.num_classes and ref.name not in ("imagefolder",):
        raise InvalidConfigError(
            f"num_classes={num_classes} but dataset {ref.name} has {data.num_classes} classes"
        )
    notes: list[str] = []
    source = weights if weights is not None else resolved.weights
    # A Hub model keeps its own classifier until its weights are in, then gets the dataset's.
    own_classes = resolved.num_classes if weights is None and resolved.weights else None
    model = build_model(
        resolved.architecture,
        own_classes or num_classes,
        in_chans=config.in_chans,
        input_size=size,
        pretrained=config.pretrained,
        caches=caches,
    )
    weights_sha256 = None
    if source is not None:
        load_weights(model, source, reference=config.model)
        weights_sha256 = sha256_file(source)
        if resolved.weights is not None and weights is None:
            notes.append(f"weights: {config.model} from the local Hugging Face cache")
        if own_classes and own_classes != num_classes:
            replace_classifier(model, num_classes)
            notes.append(
                f"classifier replaced: {config.model} has {own_classes} classes, "
                f"the dataset {num_classes} (a new head, trained by the recovery)"
            )
    elif config.pretrained:
        notes.append(f"weights: {config.model}'s published weights from the local cache")
    else:
        notes.append("no weights given: compressed a randomly initialised model")
    cfg = resolved.pretrained_cfg or {}
    if ("mean" in cfg or "std" in cfg) and config.data.normalization != "pretrained":
        # Weights trained with other statistics lose accuracy silently: say so in the report.
        notes.append(
            f"{config.model} states its own normalisation (mean {cfg.get('mean')}, std "
            f"{cfg.get('std')}); the inputs were normalised as data.normalization="
            f"{config.data.normalization!r} says (choose 'pretrained' for the model's own)"
        )
    return Prepared(
        config=config,
        data=data,
        model=model,
        architecture=resolved.architecture,
        pretrained_cfg=dict(resolved.pretrained_cfg) if resolved.pretrained_cfg else None,
        num_classes=num_classes,
        input_size=size,
        weights_sha256=weights_sha256,
        notes=tuple(notes),
        load_s=time.perf_counter() - started,
    )


def _hub_input_size(cfg: object) -> int | None:
    """The input side an ``hf-hub:`` model's ``pretrained_cfg`` gives (``input_size``)."""
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, list | tuple) and size and isinstance(size[-1], int):
        return int(size[-1])
    return None


# --------------------------------------------------------------------------- 3. finalize


@dataclass(frozen=True)
class Measured:
    """The pruned model's plan, cost and test accuracy, and the run's verdicts."""

    plan: Plan
    pruned_cost: tuple[int, int]
    base_test: tuple[float, float]
    pruned_test: tuple[float, float]
    target_met: bool
    guarantee: Guarantee | None
    deployment: DeploymentOutcome | None = None


def finalize(job: Prepared, result: CompressionResult) -> Measured:
    """Judge the result, then measure it on the test split.

    The verdicts come first, on what the run already knows (MACs) and on the validation split
    (the output bound), so a job that must fail does so before reading the test split:
    a missed MACs target raises ``BudgetExceededError`` (with the best ratio reached) when
    ``on_target_missed`` is ``fail``; an exceeded output bound raises
    ``GuaranteeExceededError`` when ``guarantee.enforce``. The test split is read here, once.
    """
    ctx, pruned, config = result.context, result.model, job.config
    ctx.check_cancel()
    ctx.emit(Stage.EXPORT, 0, 3, message="final evaluation on the test split")
    pruned_cost = ctx.cost(pruned)
    deployment = deployment_outcome(ctx, pruned)
    macs_met = ctx.reached_target(pruned_cost[0])
    latency_met = deployment is None or deployment.latency_target_met is not False
    target_met = macs_met and latency_met
    if not target_met and config.on_target_missed == "fail":
        missed = []
        if not macs_met:
            missed.append(
                f"MACs target {config.target_macs:.1%} of the base (the best model reached "
                f"keeps {pruned_cost[0] / ctx.base_macs:.1%})"
            )
        if not latency_met and deployment is not None:
            missed.append(
                f"latency target on {deployment.deployment} (reached {deployment.pruned_ms:.3g} "
                f"ms, {deployment.speedup:.2f}x the base's {deployment.base_ms:.3g} ms)"
            )
        raise BudgetExceededError(
            f"{' and '.join(missed)} not reached within the accuracy budget of "
            f"{config.max_drop:g} top-1 points (on_target_missed=fail)"
        )
    bs = config.data.eval_batch_size
    with ctx.timer("evaluation"):
        rel = relative_output_error(ctx.teacher, pruned, job.data.loader("val", bs), ctx.device)
        guarantee = check_guarantee(rel, config.guarantee)
        if guarantee is not None and not guarantee.holds and config.guarantee.enforce:
            raise GuaranteeExceededError(
                f"the output bound is exceeded: the 99th percentile of the relative squared "
                f"error on the validation split is {guarantee.delta_p99:.4g}, above "
                f"guarantee.delta_max = {guarantee.delta_max:g} (guarantee.enforce)"
            )
        base_test = evaluate(ctx.teacher, job.data.loader("test", bs), ctx.device)
        pruned_test = evaluate(pruned, job.data.loader("test", bs), ctx.device)
    plan = Plan(
        model=job.architecture or config.model,
        num_classes=job.num_classes,
        in_chans=job.data.in_chans,
        input_size=job.data.input_size,
        ops=result.ops,
    )
    return Measured(plan, pruned_cost, base_test, pruned_test, target_met, guarantee, deployment)


def deployment_outcome(ctx: Context, pruned: nn.Module) -> DeploymentOutcome | None:
    """Base and pruned timed alternately on the job's deployment, the speed-up's verdict, the
    latency target's, how the cost model fared, and the pruned model's parity on the
    deployment (None without a deployment). Raises ``ExportParityError`` when the deployment
    runs the pruned model to other predictions than eager float32 does (top-1 agreement below
    ``deployment.min_agreement`` on ``export.parity_samples`` validation images): the speed
    measured there would be a broken model's."""
    timer, config = ctx.deployment, ctx.config
    if timer is None or config.deployment is None:
        return None
    dep = config.deployment
    ctx.emit(Stage.EXPORT, 0, 3, message=f"timing base and pruned on {dep.label()}")
    with ctx.timer("latency"):
        inputs = ctx.data.sample_inputs(config.export.parity_samples)
        cmp = timer.compare(ctx.teacher, pruned, inputs, dep.min_agreement)
        label = timer.device_label
    parity = cmp.parity
    assert parity is not None
    if not parity.passed:
        raise ExportParityError(
            f"on {dep.label()} the pruned model agrees with eager float32 on the top-1 class "
            f"of {parity.top1_agreement:.1f} % of {parity.samples} validation images, below "
            f"deployment.min_agreement = {dep.min_agreement:g} % (max |logit difference| "
            f"{parity.max_abs_diff:.3g})"
        )
    spread = max(cmp.base.spread, cmp.pruned.spread)
    speedup = cmp.speedup
    met = None
    if config.has_latency_target:
        met = (config.target_latency_ms is None or cmp.pruned.ms <= config.target_latency_ms) and (
            config.target_speedup is None or speedup >= config.target_speedup
        )
    return DeploymentOutcome(
        deployment=dep.label(),
        runtime=dep.runtime,
        device=label,
        batch_size=dep.batch_size,
        dtype=dep.dtype,
        threads=dep.threads,
        base_ms=cmp.base.ms,
        pruned_ms=cmp.pruned.ms,
        speedup=speedup,
        spread=spread,
        verdict=speedup_verdict(speedup, spread),
        target_latency_ms=config.target_latency_ms,
        target_speedup=config.target_speedup,
        latency_target_met=met,
        cost_model=_cost_model_stats(ctx),
        parity=parity,
    )


def _cost_model_stats(ctx: Context) -> CostModelStats | None:
    table = ctx.cost_table
    if table is None:
        return None
    errors = [
        abs(r.predicted_latency_ms - r.latency_ms) / r.latency_ms * 100
        for r in ctx.steps
        if r.predicted_latency_ms is not None and r.latency_ms
    ]
    return CostModelStats(
        table_entries=len(table.entries),
        measured=table.measured,
        reused=table.reused,
        build_s=round(table.build_s, 3),
        cache_file=str(table.path) if table.path is not None else None,
        steps_checked=len(errors),
        mean_abs_error_pct=round(sum(errors) / len(errors), 2) if errors else None,
        max_abs_error_pct=round(max(errors), 2) if errors else None,
    )


def check_guarantee(rel: torch.Tensor, cfg: GuaranteeConfig) -> Guarantee | None:
    """The output bound on per-sample relative squared errors ``rel``: its 99th percentile
    against the tolerance ``cfg.delta_max`` (None when there were no samples)."""
    if not len(rel):
        return None
    p99 = float(np.percentile(rel.numpy(), 99))
    return Guarantee(delta_p99=p99, delta_max=cfg.delta_max, holds=p99 <= cfg.delta_max)


# --------------------------------------------------------------------------- 4. publish


@dataclass(frozen=True)
class Published:
    """What the artifacts' checks and timings add to the report."""

    parity: list[ParityRecord]
    pruned_weights_sha256: str
    quantized: list[QuantizedArtifact]
    latency: list[LatencyRecord]
    combination: list[CombinationRow]


def publish(
    job: Prepared, result: CompressionResult, measured: Measured, out: Path, started: float
) -> CompressionReport:
    """Write every artifact and the report into a scratch folder beside ``out``, then move it
    into place (replacing ``out``) in one rename; on any failure the scratch folder goes and
    ``out`` is untouched."""
    ctx = result.context
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    scratch = parent / f".{out.name}.partial-{os.getpid()}-{time.monotonic_ns()}"
    scratch.mkdir()
    try:
        published = _write_artifacts(job, result, measured, scratch)
        report = _report(job, result, measured, published, started)
        names = write_report(report, scratch)
        files = sorted({p.name for p in scratch.iterdir() if p.is_file()} | set(names))
        write_manifest(scratch, files)
        if out.exists():
            shutil.rmtree(out)
        os.replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    ctx.emit(Stage.EXPORT, 3, 3, macs=report.pruned.macs, top1=report.pruned.top1, message="done")
    return report


def _write_artifacts(
    job: Prepared, result: CompressionResult, measured: Measured, scratch: Path
) -> Published:
    """Exports with their parity checks, the weights and the plan (checked by replaying it),
    the quantized variants, and the latency tables, in ``scratch``."""
    ctx, pruned, config = result.context, result.model, job.config
    ctx.emit(Stage.EXPORT, 1, 3, message="exporting and checking parity")
    pruned_cpu = copy.deepcopy(pruned).cpu().eval()
    inputs = job.data.sample_inputs(config.export.parity_samples)
    contract = job.data.contract
    onnx_file = scratch / get_exporter("onnx").file
    with ctx.timer("export"):
        parity = export_model(pruned_cpu, inputs, scratch, config.export, contract)
        atomic_write_text(scratch / CONTRACT_FILE, contract.to_json())
        if config.export.embed_preprocessing:
            parity.append(_raw_onnx(job, onnx_file, scratch / RAW_FILE))
        save_weights(pruned_cpu, scratch / WEIGHTS_FILE)
        atomic_write_text(scratch / PLAN_FILE, measured.plan.model_dump_json(indent=2))
        parity.append(_check_plan_replay(measured.plan, scratch, pruned_cpu, inputs, config))
    input_shape = (job.data.in_chans, job.input_size, job.input_size)
    quantized: list[QuantizedArtifact] = []
    if config.quantize.modes:
        ctx.check_cancel()
        ctx.emit(Stage.EXPORT, 1, 3, message="quantizing: " + ", ".join(config.quantize.modes))
        with ctx.timer("quantization"):
            quantized = build_quantized(onnx_file, scratch, job.data, config.quantize)
    latency: list[LatencyRecord] = []
    if config.latency.enabled:
        ctx.emit(Stage.EXPORT, 2, 3, message="timing base and pruned models")
        with ctx.timer("latency"):
            latency = compare_latency(
                copy.deepcopy(ctx.teacher).eval(),
                copy.deepcopy(pruned).eval(),
                input_shape,
                config.latency,
                ctx.device,
                scratch / "_latency",
            )
        shutil.rmtree(scratch / "_latency", ignore_errors=True)
    combination: list[CombinationRow] = []
    if quantized:
        ctx.emit(Stage.EXPORT, 2, 3, message="timing the quantized variants")
        with ctx.timer("latency"):
            combination, quantized = combination_table(
                ctx.teacher,
                (*measured.base_test, ctx.base_macs),
                onnx_file,
                (*measured.pruned_test, measured.pruned_cost[0]),
                quantized,
                input_shape,
                config.latency if config.latency.enabled else None,
                ctx.device,
                scratch / "_combination",
                distillation=config.recovery.distillation,
            )
        shutil.rmtree(scratch / "_combination", ignore_errors=True)
    return Published(
        parity=parity,
        pruned_weights_sha256=sha256_file(scratch / WEIGHTS_FILE),
        quantized=quantized,
        latency=latency,
        combination=combination,
    )


def _raw_onnx(job: Prepared, onnx_file: Path, dest: Path) -> ParityRecord:
    """model.raw.onnx from model.onnx, checked on validation images as a deployment holds
    them (uint8 NHWC at the input size) against model.onnx fed their normalised tensor."""
    images, _ = job.data.raw_samples(job.config.export.parity_samples)
    normalised = job.data.transform(augment=False).normalise_raw(images)
    write_raw_onnx(onnx_file, dest, job.data.contract)
    return check_raw_parity(
        dest, onnx_file, images.numpy(), normalised.numpy(), job.config.export.parity_atol
    )


def _check_plan_replay(
    plan: Plan, folder: Path, model: nn.Module, inputs: torch.Tensor, config: CompressionConfig
) -> ParityRecord:
    """Rebuild from plan.json + weights and compare logits with the pruned model."""
    rebuilt = rebuild(plan, folder / WEIGHTS_FILE)
    with torch.no_grad():
        reference = model(inputs)
        diff = float((rebuilt(inputs) - reference).abs().max())
    tolerance = config.export.parity_tolerance(float(reference.abs().max()))
    rec = ParityRecord(
        format="plan_replay",
        max_abs_diff=diff,
        samples=len(inputs),
        passed=diff <= tolerance,
        tolerance=tolerance,
    )
    if not rec.passed:
        raise ExportParityError(f"plan replay differs from the pruned model by {diff:.3g}")
    return rec


def _report(
    job: Prepared,
    result: CompressionResult,
    measured: Measured,
    published: Published,
    started: float,
) -> CompressionReport:
    ctx: Context = result.context
    config = job.config
    base_top1, base_top5 = measured.base_test
    top1, top5 = measured.pruned_test
    macs, params = measured.pruned_cost
    latency = published.latency

    def lat(which: str) -> dict[str, float]:
        return {
            f"{r.runtime}@b{r.batch_size}": round(r.base_ms if which == "base" else r.pruned_ms, 4)
            for r in latency
        }

    headline = next(
        (r for r in latency if r.runtime == "onnxruntime" and r.batch_size == 1),
        latency[0] if latency else None,
    )
    timings = {
        "load": job.load_s,
        **{k: float(v) for k, v in ctx.timings.items()},
        "total": time.perf_counter() - started,
    }
    env = environment()
    env["device_used"] = str(ctx.device)
    return CompressionReport(
        model=config.model,
        dataset=config.dataset,
        config=config,
        base=ModelMetrics(
            top1=round(base_top1, 3),
            top5=round(base_top5, 3),
            macs=ctx.base_macs,
            params=ctx.base_params,
            latency_ms=lat("base"),
        ),
        pruned=ModelMetrics(
            top1=round(top1, 3),
            top5=round(top5, 3),
            macs=macs,
            params=params,
            latency_ms=lat("pruned"),
        ),
        macs_ratio=macs / ctx.base_macs,
        target_met=measured.target_met,
        params_ratio=params / ctx.base_params,
        top1_drop=round(base_top1 - top1, 3),
        # The job's own deployment, when it named one, is the headline: it is where the
        # model will run.
        speedup=(
            round(measured.deployment.speedup, 4)
            if measured.deployment
            else round(headline.speedup, 4)
            if headline
            else None
        ),
        speedup_runtime=(
            measured.deployment.deployment
            if measured.deployment
            else f"{headline.runtime}@b{headline.batch_size}"
            if headline
            else None
        ),
        latency=latency,
        deployment=measured.deployment,
        steps=ctx.steps,
        recovery_iterations={str(k): v for k, v in ctx.recovery_iters.items()},
        guarantee=measured.guarantee,
        parity=published.parity,
        quantized=published.quantized,
        combination=published.combination,
        timings_s={k: round(v, 3) for k, v in timings.items()},
        environment=env,
        splits=job.data.sizes(),
        weights_sha256=job.weights_sha256,
        pruned_weights_sha256=published.pruned_weights_sha256,
        input_contract=job.data.contract,
        notes=[*job.notes, *ctx.notes],
    )


__all__ = ["Measured", "Prepared", "Published", "compress", "finalize", "prepare", "publish"]
