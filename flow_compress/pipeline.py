"""The IDAP++ pipeline end to end: load → baseline → stage 1 → stage 2 → fine-tune → export →
report. ``compress`` is the library's entry point; the CLI and the worker call it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flow_compress.artifacts import atomic_write_text, write_manifest
from flow_compress.checkpoint import Checkpointer, attach, fingerprint, resume
from flow_compress.config import CompressionConfig
from flow_compress.context import CancelFn, Context, ProgressFn
from flow_compress.data import DataSplits, load_dataset
from flow_compress.device import resolve_device, seed_everything
from flow_compress.errors import ExportParityError, InvalidConfigError
from flow_compress.evaluate import evaluate, relative_output_error
from flow_compress.export import FILE_NAMES as EXPORT_FILE_NAMES
from flow_compress.export import export_model
from flow_compress.latency import compare_latency, environment
from flow_compress.models import build_model, load_weights, save_weights
from flow_compress.plan import Plan, rebuild
from flow_compress.quantize import build_quantized, combination_table
from flow_compress.refs import known_num_classes, parse_dataset_ref
from flow_compress.registry import get_architecture
from flow_compress.report import write_report
from flow_compress.schema import (
    CombinationRow,
    CompressionReport,
    Guarantee,
    LatencyRecord,
    ModelMetrics,
    ParityRecord,
    QuantizedArtifact,
)
from flow_compress.stage1 import FilterPruner
from flow_compress.stage2 import run_stage2


@dataclass
class CompressionResult:
    """What ``run_pipeline`` hands back: the pruned model, its plan and the measured run."""

    model: nn.Module
    plan: Plan
    context: Context


def make_context(
    model: nn.Module,
    data: DataSplits,
    config: CompressionConfig,
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> tuple[Context, nn.Module]:
    """Seed, pick the device, freeze a copy of ``model`` as the teacher, and return the shared
    context with the student (another copy) that the stages prune."""
    seed_everything(config.seed)
    device = resolve_device(config.device)
    teacher = copy.deepcopy(model).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(model).to(device).eval()
    example = data.sample_inputs(1).to(device)
    ctx = Context(
        config=config,
        data=data,
        device=device,
        teacher=teacher,
        example=example,
        base_macs=0,
        base_params=0,
        progress_fn=progress,
        cancel_fn=should_cancel,
    )
    ctx.base_macs, ctx.base_params = ctx.cost(student)
    return ctx, student


def run_pipeline(
    model: nn.Module,
    data: DataSplits,
    config: CompressionConfig,
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    checkpoint: Checkpointer | None = None,
) -> CompressionResult:
    """Compress ``model`` (not modified; a copy is pruned) on ``data``; no files are written
    except ``checkpoint``'s, after every accepted step; a usable checkpoint found there is
    resumed from (``flow_compress.checkpoint``).

    Accuracy per step is measured on the validation split; the test split is not touched.
    """
    ctx, student = make_context(model, data, config, progress=progress, should_cancel=should_cancel)
    ctx.check_cancel()
    resumed = resume(checkpoint, ctx, student) if checkpoint is not None else None
    if resumed is not None:
        student = resumed
    else:
        base = ctx.record(student, "Baseline")
        ctx.base_val_top1 = base.top1
        ctx.emit("Baseline", 1, 1, macs=base.macs, top1=base.top1, message="baseline measured")
    if checkpoint is not None:
        attach(checkpoint, ctx)
    stage, done = ctx.resumed_from or ("Filter Prune", 0)

    stage_start = time.perf_counter()
    if config.prune.enabled and stage == "Filter Prune":
        student = FilterPruner(ctx).run(student, start_step=done)
        # End of stage 1 (checkpointed as stage 2 with nothing removed yet).
        ctx.accepted(student, "Layer Trunc", 0)
    ctx.timings["stage1_total"] = time.perf_counter() - stage_start

    stage_start = time.perf_counter()
    if config.truncate.enabled and config.truncate.max_layers > 0:
        student = run_stage2(student, ctx, start_removed=done if stage == "Layer Trunc" else 0)
    ctx.timings["stage2_total"] = time.perf_counter() - stage_start

    stage_start = time.perf_counter()
    ctx.check_cancel()
    if config.recovery.final_iters > 0 and len(ctx.steps) > 1:
        tuned = copy.deepcopy(student)
        ctx.recover(
            tuned, config.recovery.final_iters, "Final Fine-Tune", lr=config.recovery.final_lr
        )
        top = ctx.val_accuracy(tuned)
        # The fine-tune is kept only if it does not hurt validation accuracy: a short schedule
        # on a well-recovered model can overshoot.
        if top[0] >= ctx.steps[-1].top1 - 1e-9:
            student = tuned
            ctx.record(student, "Final Fine-Tune", top=top)
        else:
            ctx.record(
                student,
                "Final Fine-Tune",
                accepted=False,
                detail=f"fine-tune reached {top[0]:.2f}, kept the model before it",
            )
    ctx.emit("Final Fine-Tune", 1, 1, macs=ctx.steps[-1].macs, top1=ctx.steps[-1].top1)
    ctx.timings["finetune_total"] = time.perf_counter() - stage_start

    spec_size = data.input_size
    plan = Plan(
        model="",
        num_classes=0,
        in_chans=data.in_chans,
        input_size=spec_size,
        ops=list(ctx.plan_ops),
    )
    return CompressionResult(student.eval(), plan, ctx)


def compress(
    config: CompressionConfig,
    *,
    weights: str | Path | None,
    out_dir: str | Path,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    overwrite: bool = False,
    checkpoint_dir: str | Path | None = None,
) -> CompressionReport:
    """Compress ``config.model`` loaded from ``weights`` and write every artifact to ``out_dir``.

    Artifacts: model.ts, model.onnx (per ``export.formats``), weights.safetensors, plan.json,
    report.json, report.md, PNG plots, manifest.json, and per ``quantize.modes`` the checked
    model.int8_static.onnx, model.int8_dynamic.onnx, model.fp16.onnx
    (``flow_compress.quantize``). They are written to a scratch folder beside ``out_dir`` and
    moved into place only when all of them succeeded, so ``out_dir``
    never holds a half-written result. ``out_dir`` must not exist or be empty unless
    ``overwrite``. Raises ``FlowCompressError`` subclasses (stable ``code``s).

    With ``checkpoint_dir``, every accepted step is checkpointed there and a later call with
    the same configuration, weights and folder continues from the last one (the report's
    notes say so); the caller removes the folder when it no longer needs it.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InvalidConfigError(f"output folder {out} is not empty (pass overwrite)")
    spec = get_architecture(config.model)
    size = config.input_size or spec.default_input_size
    ref = parse_dataset_ref(config.dataset)
    data = load_dataset(ref, input_size=size, in_chans=config.in_chans, config=config.data)
    num_classes = config.num_classes or known_num_classes(ref) or data.num_classes
    if num_classes != data.num_classes and ref.name not in ("imagefolder",):
        raise InvalidConfigError(
            f"num_classes={num_classes} but dataset {ref.name} has {data.num_classes} classes"
        )
    model = build_model(config.model, num_classes, in_chans=config.in_chans, input_size=size)
    weights_sha = None
    notes: list[str] = []
    if weights is not None:
        load_weights(model, weights)
        weights_sha = _sha256(Path(weights))
    else:
        notes.append("no weights given: compressed a randomly initialised model")
    load_s = time.perf_counter() - t0

    checkpoint = (
        Checkpointer(checkpoint_dir, fingerprint(config, weights_sha))
        if checkpoint_dir is not None
        else None
    )
    result = run_pipeline(
        model, data, config, progress=progress, should_cancel=should_cancel, checkpoint=checkpoint
    )
    ctx = result.context
    pruned = result.model
    plan = result.plan.model_copy(update={"model": config.model, "num_classes": num_classes})
    device = ctx.device

    ctx.check_cancel()
    ctx.emit("Export", 0, 3, message="final evaluation on the test split")
    bs = config.data.eval_batch_size
    with ctx.timer("evaluation"):
        base_test = evaluate(ctx.teacher, data.loader("test", bs), device)
        pruned_test = evaluate(pruned, data.loader("test", bs), device)
        rel = relative_output_error(ctx.teacher, pruned, data.loader("val", bs), device)
    pruned_cost = ctx.cost(pruned)
    guarantee = (
        Guarantee(delta_p99=float(torch.quantile(rel, 0.99)), delta_max=float(rel.max()))
        if len(rel)
        else None
    )

    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    scratch = parent / f".{out.name}.partial-{os.getpid()}-{time.monotonic_ns()}"
    scratch.mkdir()
    try:
        ctx.emit("Export", 1, 3, message="exporting and checking parity")
        pruned_cpu = copy.deepcopy(pruned).cpu().eval()
        inputs = data.sample_inputs(config.export.parity_samples)
        with ctx.timer("export"):
            parity = export_model(pruned_cpu, inputs, scratch, config.export)
            save_weights(pruned_cpu, scratch / "weights.safetensors")
            atomic_write_text(scratch / "plan.json", plan.model_dump_json(indent=2))
            parity.append(_check_plan_replay(plan, scratch, pruned_cpu, inputs, config))
        quantized: list[QuantizedArtifact] = []
        if config.quantize.modes:
            ctx.check_cancel()
            ctx.emit("Export", 1, 3, message="quantizing: " + ", ".join(config.quantize.modes))
            with ctx.timer("quantization"):
                quantized = build_quantized(
                    scratch / EXPORT_FILE_NAMES["onnx"], scratch, data, config.quantize
                )
        latency: list[LatencyRecord] = []
        if config.latency.enabled:
            ctx.emit("Export", 2, 3, message="timing base and pruned models")
            with ctx.timer("latency"):
                latency = compare_latency(
                    copy.deepcopy(ctx.teacher).eval(),
                    copy.deepcopy(pruned).eval(),
                    (data.in_chans, size, size),
                    config.latency,
                    device,
                    scratch / "_latency",
                )
            shutil.rmtree(scratch / "_latency", ignore_errors=True)
        combination: list[CombinationRow] = []
        if quantized:
            ctx.emit("Export", 2, 3, message="timing the quantized variants")
            with ctx.timer("latency"):
                combination, quantized = combination_table(
                    ctx.teacher,
                    (*base_test, ctx.base_macs),
                    scratch / EXPORT_FILE_NAMES["onnx"],
                    (*pruned_test, pruned_cost[0]),
                    quantized,
                    (data.in_chans, size, size),
                    config.latency if config.latency.enabled else None,
                    device,
                    scratch / "_combination",
                    distillation=config.recovery.distillation,
                )
            shutil.rmtree(scratch / "_combination", ignore_errors=True)
        report = _build_report(
            config,
            ctx,
            pruned_cost,
            base_test,
            pruned_test,
            guarantee,
            parity,
            latency,
            weights_sha,
            notes,
            load_s,
            t0,
        )
        if quantized:
            report = report.model_copy(update={"quantized": quantized, "combination": combination})
        names = write_report(report, scratch)
        files = sorted({p.name for p in scratch.iterdir() if p.is_file()} | set(names))
        write_manifest(scratch, files)
        if out.exists():
            shutil.rmtree(out)
        os.replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    ctx.emit("Export", 3, 3, macs=report.pruned.macs, top1=report.pruned.top1, message="done")
    return report


def _check_plan_replay(
    plan: Plan, folder: Path, model: nn.Module, inputs: torch.Tensor, config: CompressionConfig
) -> ParityRecord:
    """Rebuild from plan.json + weights and compare logits with the pruned model."""
    rebuilt = rebuild(plan, folder / "weights.safetensors")
    with torch.no_grad():
        diff = float((rebuilt(inputs) - model(inputs)).abs().max())
    rec = ParityRecord(
        format="plan_replay",
        max_abs_diff=diff,
        samples=len(inputs),
        passed=diff <= config.export.parity_atol,
    )
    if not rec.passed:
        raise ExportParityError(f"plan replay differs from the pruned model by {diff:.3g}")
    return rec


def _build_report(
    config: CompressionConfig,
    ctx: Context,
    pruned_cost: tuple[int, int],
    base_test: tuple[float, float],
    pruned_test: tuple[float, float],
    guarantee: Guarantee | None,
    parity: list[ParityRecord],
    latency: list[LatencyRecord],
    weights_sha: str | None,
    notes: list[str],
    load_s: float,
    started: float,
) -> CompressionReport:
    pruned_macs, pruned_params = pruned_cost

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
        "load": load_s,
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
            top1=round(base_test[0], 3),
            top5=round(base_test[1], 3),
            macs=ctx.base_macs,
            params=ctx.base_params,
            latency_ms=lat("base"),
        ),
        pruned=ModelMetrics(
            top1=round(pruned_test[0], 3),
            top5=round(pruned_test[1], 3),
            macs=pruned_macs,
            params=pruned_params,
            latency_ms=lat("pruned"),
        ),
        macs_ratio=pruned_macs / ctx.base_macs,
        params_ratio=pruned_params / ctx.base_params,
        top1_drop=round(base_test[0] - pruned_test[0], 3),
        speedup=round(headline.speedup, 4) if headline else None,
        speedup_runtime=f"{headline.runtime}@b{headline.batch_size}" if headline else None,
        latency=latency,
        steps=ctx.steps,
        recovery_iterations=dict(ctx.recovery_iters),
        guarantee=guarantee,
        parity=parity,
        timings_s={k: round(v, 3) for k, v in timings.items()},
        environment=env,
        splits=ctx.data.sizes(),
        weights_sha256=weights_sha,
        notes=notes + ctx.notes,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_report(path: str | Path) -> CompressionReport:
    return CompressionReport.model_validate(json.loads(Path(path).read_text()))
