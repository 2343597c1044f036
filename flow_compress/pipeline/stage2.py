"""Stage 2: flow-guided layer truncation (docs/algorithm.md, "Stage 2: layer truncation").

Candidates are ranked by D_res ascending (least flow contribution first). For each, in order,
a copy of the model gets the block replaced, recovers briefly by distillation, and is kept
only if its validation top-1 is at most ``tau`` points below the model before the removal
and the total drop against the original stays within ``max_drop``; otherwise it is discarded
and the next candidate is tried (``n_try`` per round). Scores are recomputed after every
acceptance. The stage stops after ``max_layers`` removals or a round with no acceptance.

Choice: stage 1 already meets the MACs target, so stage 2 does not stop on the target — it
keeps removing blocks while the accuracy budget allows (up to ``max_layers``), because removed
depth is the cheapest latency there is; set ``truncate.max_layers=0`` to keep depth.

A candidate may span several sibling modules (VGG's conv → BN → ReLU): all of them are
replaced together, and the plan records one ``replace`` operation per module path, so
``plan.apply_plan`` replays it with no special case.
"""

from __future__ import annotations

import copy

from torch import nn

from flow_compress.arch.blocks import find_candidates, make_replacement
from flow_compress.arch.surgery import replace_module
from flow_compress.criteria import divergence
from flow_compress.criteria._statistics import collect_block_norms
from flow_compress.pipeline.context import Context
from flow_compress.schema import Stage

STAGE = Stage.LAYER_TRUNC


def block_scores(model: nn.Module, ctx: Context) -> dict[str, float]:
    cfg = ctx.config.truncate
    cands = find_candidates(model, ctx.example, allow_projection=cfg.allow_projection)
    if not cands:
        return {}
    calib = ctx.data.calibration_batches(cfg.calibration_batches, ctx.config.data.eval_batch_size)
    with ctx.timer("scoring"):
        norms = collect_block_norms(
            model,
            {c.name: c.branch for c in cands},
            calib,
            ctx.device,
            ends={c.name: c.span[-1] for c in cands if c.span},
        )
    return {name: divergence.residual_score(b, x) for name, (b, x) in norms.items()}


def run_stage2(model: nn.Module, ctx: Context, start_removed: int = 0) -> nn.Module:
    """Truncate ``model``; ``start_removed`` > 0 resumes a checkpointed run whose first
    removals are already in ``model`` and the context."""
    cfg = ctx.config.truncate
    removed = start_removed
    current_top1 = ctx.steps[-1].top1 if ctx.steps else ctx.val_accuracy(model)[0]
    while removed < cfg.max_layers:
        ctx.check_cancel()
        cands = {
            c.name: c
            for c in find_candidates(model, ctx.example, allow_projection=cfg.allow_projection)
        }
        scores = block_scores(model, ctx)
        order = sorted(scores, key=scores.__getitem__)[: cfg.n_try]
        accepted = False
        for name in order:
            ctx.check_cancel()
            trial = copy.deepcopy(model)
            cand = cands[name]
            with ctx.timer("surgery"):
                block = trial.get_submodule(name)
                replace_module(trial, name, make_replacement(block, cand.kind))
                for extra in cand.span:
                    replace_module(trial, extra, make_replacement(block, "identity"))
            ctx.recover(trial, ctx.config.recovery.trunc_iters, STAGE)
            top1, top5 = ctx.val_accuracy(trial)
            rise = current_top1 - top1
            if rise <= cfg.tau and ctx.drop(top1) <= ctx.config.max_drop:
                model = trial
                ctx.plan_ops.append({"op": "replace", "module": name, "with": cand.kind})
                ctx.plan_ops.extend(
                    {"op": "replace", "module": extra, "with": "identity"} for extra in cand.span
                )
                removed += 1
                current_top1 = top1
                rec = ctx.record(
                    model,
                    STAGE,
                    top=(top1, top5),
                    detail=f"{name} → {cands[name].kind} (D_res {scores[name]:.3f})",
                )
                ctx.accepted(model, STAGE, removed)
                ctx.emit(
                    STAGE,
                    removed,
                    cfg.max_layers,
                    macs=rec.macs,
                    top1=rec.top1,
                    message=f"removed {name}",
                )
                accepted = True
                break
            ctx.notes.append(
                f"Layer Trunc: {name} (D_res {scores[name]:.3f}) rejected, val top-1 "
                f"{top1:.2f} (rise {rise:.2f}, budget tau {cfg.tau})"
            )
        if not accepted:
            break
    ctx.emit(STAGE, cfg.max_layers, cfg.max_layers)
    return model
