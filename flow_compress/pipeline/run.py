"""The stages of IDAP++ on a model in memory: baseline → stage 1 (filter pruning) → stage 2
(layer truncation) → final fine-tune (docs/algorithm.md). No files are written here except
checkpoints; ``pipeline.compress`` measures, exports and publishes the result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from flow_compress._device import resolve_device, seed_everything
from flow_compress.config import CompressionConfig
from flow_compress.data import DataSplits
from flow_compress.graph.latency_cost import LatencyTable
from flow_compress.measure.deployment import DeploymentTimer, check_available
from flow_compress.pipeline.checkpoint import Checkpointer, attach, resume
from flow_compress.pipeline.context import CancelFn, Context, ProgressFn
from flow_compress.pipeline.stage1 import FilterPruner
from flow_compress.pipeline.stage2 import run_stage2
from flow_compress.schema import Stage


@dataclass
class CompressionResult:
    """What ``run_pipeline`` hands back: the pruned model (eval mode), the plan operations
    that rebuild it from the original architecture, and the run's context (records, costs,
    timings, notes, the frozen teacher)."""

    model: nn.Module
    ops: list[dict[str, Any]]
    context: Context


def make_context(
    model: nn.Module,
    data: DataSplits,
    config: CompressionConfig,
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    latency_cache: Path | None = None,
) -> tuple[Context, nn.Module]:
    """Seed, pick the device, freeze a copy of ``model`` as the teacher, and return the shared
    context with the student (another copy) that the stages prune.

    With ``config.deployment``, the deployment is checked first (``deployment_unavailable``
    before any work) and the cost model's layer table opened from ``latency_cache`` (None:
    an in-memory table for this run only)."""
    if config.deployment is not None:
        check_available(config.deployment)
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
    if config.deployment is not None:
        shape = (data.in_chans, data.input_size, data.input_size)
        ctx.deployment = DeploymentTimer(config.deployment, shape)
        if config.prune.ranking == "score_per_ms":
            ctx.cost_table = LatencyTable.open(config.deployment, latency_cache)
    return ctx, student


def run_pipeline(
    model: nn.Module,
    data: DataSplits,
    config: CompressionConfig,
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    checkpoint: Checkpointer | None = None,
    latency_cache: Path | None = None,
) -> CompressionResult:
    """Compress ``model`` (not modified; a copy is pruned) on ``data``; no files are written
    except ``checkpoint``'s, after every accepted step; a usable checkpoint found there is
    resumed from (``flow_compress.pipeline.checkpoint``).

    Accuracy per step is measured on the validation split; the test split is not touched.
    """
    ctx, student = make_context(
        model,
        data,
        config,
        progress=progress,
        should_cancel=should_cancel,
        latency_cache=latency_cache,
    )
    ctx.check_cancel()
    resumed = resume(checkpoint, ctx, student) if checkpoint is not None else None
    if resumed is not None:
        student = resumed
        ctx.base_latency_ms = ctx.steps[0].latency_ms if ctx.steps else None
        ctx.latency_now_ms = next(
            (r.latency_ms for r in reversed(ctx.steps) if r.accepted), ctx.base_latency_ms
        )
    else:
        base = ctx.record(student, Stage.BASELINE)
        ctx.base_val_top1 = base.top1
        ctx.base_latency_ms = base.latency_ms
        ctx.emit(Stage.BASELINE, 1, 1, macs=base.macs, top1=base.top1, message="baseline measured")
    if checkpoint is not None:
        attach(checkpoint, ctx)
    stage, done = ctx.resumed_from or (Stage.FILTER_PRUNE, 0)

    with ctx.timer("stage1_total"):
        if config.prune.enabled and stage is Stage.FILTER_PRUNE:
            student = FilterPruner(ctx).run(student, start_step=done)
            # End of stage 1 (checkpointed as stage 2 with nothing removed yet).
            ctx.accepted(student, Stage.LAYER_TRUNC, 0)
    with ctx.timer("stage2_total"):
        if config.truncate.enabled and config.truncate.max_layers > 0:
            start = done if stage is Stage.LAYER_TRUNC else 0
            student = run_stage2(student, ctx, start_removed=start)
    with ctx.timer("finetune_total"):
        student = final_fine_tune(student, ctx)
    if ctx.cost_table is not None:
        ctx.cost_table.save()
    return CompressionResult(student.eval(), list(ctx.plan_ops), ctx)


def final_fine_tune(model: nn.Module, ctx: Context) -> nn.Module:
    """Distil the whole network from the original (``recovery.final_iters`` steps, at
    ``recovery.final_lr``) when anything was pruned. The fine-tuned model is kept only if its
    validation top-1 is not below the model before it: a short schedule on a well-recovered
    model can overshoot. Either way the attempt is recorded."""
    rc = ctx.config.recovery
    ctx.check_cancel()
    if rc.final_iters > 0 and len(ctx.steps) > 1:
        tuned = copy.deepcopy(model)
        ctx.recover(tuned, rc.final_iters, Stage.FINAL_FINE_TUNE, lr=rc.final_lr)
        top = ctx.val_accuracy(tuned)
        if top[0] >= ctx.steps[-1].top1 - 1e-9:
            model = tuned
            ctx.record(model, Stage.FINAL_FINE_TUNE, top=top)
        else:
            ctx.record(
                model,
                Stage.FINAL_FINE_TUNE,
                accepted=False,
                detail=f"fine-tune reached {top[0]:.2f}, kept the model before it",
            )
    ctx.emit(Stage.FINAL_FINE_TUNE, 1, 1, macs=ctx.steps[-1].macs, top1=ctx.steps[-1].top1)
    return model


__all__ = ["CompressionResult", "final_fine_tune", "make_context", "run_pipeline"]
