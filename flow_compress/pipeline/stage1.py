"""Stage 1: divergence-aware filter pruning (docs/algorithm.md, "Stage 1: filter pruning").

Each step: calibrate on the validation split → score every prunable group with the configured
criterion (``flow_compress.criteria``) → rank globally → remove the lowest-ranked units until
the step's MACs target is saved → recover by distillation → evaluate on the validation split.
A step whose accuracy drop against the original exceeds ``max_drop`` is rolled back and
retried with half the MACs cut (at most ``prune.retries`` times); if it still fails, the stage
stops with the last accepted model. With a latency target, a step that measures slower on the
deployment than the model before it (beyond the noise), or saves far less than the cost model
predicted, is rolled back and retried the same way.

Choices (their reasons are in docs/algorithm.md):
- Ranking ``score`` (the default) orders units by score alone, as the paper does;
  ``score_per_mac`` divides the score by the MACs the unit's removal saves (all coupled
  producers and consumers); ``auto`` prunes a copy both ways each step, evaluates both on
  calibration batches before recovery, and keeps the better.
- The per-layer cap is cumulative against the original width: a group keeps at least
  ``max(min_channels, ceil((1 - max_layer_ratio) * original))`` channels, rounded up to
  ``round_to``. A head group keeps at least one head and
  ``ceil((1 - max_layer_ratio) * original)`` heads; ``min_channels`` and ``round_to`` apply to
  channels only. Heads share the global ranking with channels and neurons.
- A step re-scores and prunes again (at most three passes) when rounding or coupling left its
  MACs more than 1 % above the step target.
- With a latency target the schedule runs on the deployment's measured latency: the same
  decay shape from the base latency towards the target, each step asking for the
  milliseconds between the current *measured* latency and its step target. Ranking
  ``score_per_ms`` cuts groups between their fast widths by importance per millisecond
  (``pipeline.latency_selection``), predicting the saving with the layer table scaled by the
  measured model's time over its layers' summed time (what the layers leave out —
  activations, additions, memory traffic — shrinks with them); the other rankings convert
  the milliseconds into MACs at the model's measured milliseconds per MAC.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from flow_compress.arch.surgery import classifier_path
from flow_compress.criteria import ScoreRequest, get_criterion
from flow_compress.errors import UnsupportedModelError
from flow_compress.graph import PrunableGroup, PruningGraph
from flow_compress.graph.latency_cost import (
    LatencyTable,
    group_curve,
    layers_ms,
    member_layers,
)
from flow_compress.pipeline.context import Context
from flow_compress.pipeline.latency_selection import Option, select_by_latency
from flow_compress.schema import SPEEDUP_NOISE, Stage

STAGE = Stage.FILTER_PRUNE
_PASSES = 3


def decay_schedule(target: float, steps: int) -> list[float]:
    """Cumulative MACs keep fractions 1 − (1 − r)·(1 − (1 − k/K)³), k = 1..K."""
    return [1 - (1 - target) * (1 - (1 - k / steps) ** 3) for k in range(1, steps + 1)]


def paper_ratios(steps: int, alpha: float, beta: float) -> list[float]:
    """Per-step channel ratios ρ_k = β·(1 + k/K)^α, k = 0..K-1 (the authors' schedule)."""
    return [min(0.9, beta * (1 + k / steps) ** alpha) for k in range(steps)]


@dataclass
class _Selection:
    removals: dict[str, list[int]]
    saved: float


@dataclass(frozen=True)
class _Schedule:
    """Cumulative keep fractions of the MACs and of the base latency per step (decay shape),
    and the paper schedule's per-step channel ratios."""

    fractions: list[float]
    ms_fractions: list[float] | None
    ratios: list[float]


@dataclass
class _Aim:
    """What one step cuts: MACs and milliseconds to remove (halved on each retry) and, for
    the paper's schedule, the most channels. ``macs_target`` / ``ms_target``: whether the step
    has a MACs / a latency target at all."""

    macs_target: bool
    ms_target: bool
    reduction: float
    reduction_ms: float
    max_count: int | None

    @property
    def asks_nothing(self) -> bool:
        return self.reduction <= 0 and self.reduction_ms <= 0

    def halve(self) -> None:
        self.reduction /= 2
        self.reduction_ms /= 2
        if self.max_count is not None:
            self.max_count = max(1, self.max_count // 2)


class FilterPruner:
    """Runs stage 1 on ``model`` in place; the accepted model is returned."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cfg = ctx.config.prune
        # The context's dict, so a checkpoint can save it and a resumed run restore it.
        self.original_sizes: dict[str, int] = ctx.original_widths

    # ------------------------------------------------------------ graph + scores

    def _graph(self, model: nn.Module) -> PruningGraph:
        try:
            head = model.get_submodule(classifier_path(model))
        except LookupError as exc:
            raise UnsupportedModelError(f"{type(model).__name__}: {exc}") from exc
        with self.ctx.timer("surgery"):
            return PruningGraph(model, self.ctx.example, ignored=[head])

    def scores(
        self, model: nn.Module, graph: PruningGraph, groups: list[PrunableGroup]
    ) -> list[torch.Tensor]:
        """Per-root-unit scores of every group by ``prune.criterion`` (higher = keep), on
        calibration batches of the validation split."""
        ctx = self.ctx
        criterion = get_criterion(self.cfg.criterion)
        calib = ctx.data.calibration_batches(
            self.cfg.calibration_batches, ctx.config.data.eval_batch_size
        )
        with ctx.timer("scoring"):
            return criterion.score(ScoreRequest(model, graph, groups, calib, ctx.device, self.cfg))

    # ------------------------------------------------------------ selection

    def _keep_min(self, g: PrunableGroup) -> int:
        orig = self.original_sizes.setdefault(g.root_name, g.size)
        if g.unit == "head":
            return min(g.size, max(1, math.ceil((1 - self.cfg.max_layer_ratio) * orig)))
        keep = max(self.cfg.min_channels, math.ceil((1 - self.cfg.max_layer_ratio) * orig))
        if self.cfg.round_to:
            keep = math.ceil(keep / self.cfg.round_to) * self.cfg.round_to
        return min(keep, g.size)

    def select(
        self,
        groups: list[PrunableGroup],
        scores: list[torch.Tensor],
        ranking: str,
        need_macs: float,
        max_count: int | None,
    ) -> _Selection:
        """Greedy global selection: lowest key first until ``need_macs`` are saved."""
        keys, owners, chans = [], [], []
        for gi, (g, s) in enumerate(zip(groups, scores, strict=True)):
            k = s.double() / g.cost if ranking == "score_per_mac" else s.double()
            keys.append(k)
            owners.append(torch.full((g.size,), gi, dtype=torch.long))
            chans.append(torch.arange(g.size))
        if not keys:
            return _Selection({}, 0.0)
        key = torch.cat(keys)
        owner = torch.cat(owners)
        chan = torch.cat(chans)
        order = torch.argsort(key, stable=True)
        budget = [g.size - self._keep_min(g) for g in groups]
        picked: dict[int, list[int]] = {}
        saved, count = 0.0, 0
        for i in order.tolist():
            if saved >= need_macs or (max_count is not None and count >= max_count):
                break
            gi = int(owner[i])
            if budget[gi] <= 0:
                continue
            budget[gi] -= 1
            c = int(chan[i])
            picked.setdefault(gi, []).append(c)
            saved += float(groups[gi].cost[c])
            count += 1
        removals: dict[str, list[int]] = {}
        saved = 0.0
        for gi, chosen in picked.items():
            g = groups[gi]
            n_remove = len(chosen)
            if self.cfg.round_to and g.unit == "channel":
                kept = math.ceil((g.size - n_remove) / self.cfg.round_to) * self.cfg.round_to
                n_remove = max(0, g.size - kept)
            chosen = chosen[:n_remove]  # lowest keys were picked first
            if chosen:
                removals[g.root_name] = sorted(chosen)
                saved += float(g.cost[chosen].sum())
        return _Selection(removals, saved)

    def apply(
        self, model: nn.Module, graph: PruningGraph, groups: list[PrunableGroup], sel: _Selection
    ) -> list[dict[str, object]]:
        by_name = {g.root_name: g for g in groups}
        entries = []
        with self.ctx.timer("surgery"):
            for name, idxs in sel.removals.items():
                entries.append(graph.prune(by_name[name], idxs))
            graph.verify(list(sel.removals))
        return entries

    # ------------------------------------------------------------ one cut by latency

    def cut_by_latency(
        self, model: nn.Module, target_macs: float | None, target_ms: float | None
    ) -> tuple[nn.Module, list[dict[str, object]], float | None]:
        """Prune ``model`` towards ``target_ms`` on the deployment (and ``target_macs`` when
        given) by score per millisecond saved; returns the model, the plan entries and the
        predicted end-to-end latency."""
        ctx = self.ctx
        table = ctx.cost_table
        now = ctx.latency_now_ms
        assert table is not None and now is not None, "score_per_ms needs a deployment"
        macs, _ = ctx.cost(model)
        need_ms = max(0.0, now - target_ms) if target_ms is not None else 0.0
        need_macs = max(0.0, macs - target_macs) if target_macs is not None else 0.0
        if need_ms <= 0 and need_macs <= 0.01 * macs:
            return model, [], None
        graph = self._graph(model)
        groups = graph.groups()
        scores = self.scores(model, graph, groups)
        with ctx.timer("cost_model"):
            # The first pass times the layers the table lacks; once they are re-timed
            # (``LatencyTable.recheck``), a second pass reads the curves again if any fell.
            for _ in range(2):
                layer_sum = layers_ms(model, graph.in_shapes, table)
                options = self._options(graph, groups, scores, table)
                if not table.recheck():
                    break
            # Milliseconds of the whole model per millisecond of its layers.
            scale = now / layer_sum if layer_sum > 0 else 1.0
            table.save()
        eff = ctx.saving_efficiency
        sel = select_by_latency(
            options,
            need_ms / (scale * eff),
            need_macs,
            ms_per_mac=(now / scale) / max(macs, 1),
            round_to=self.cfg.round_to,
        )
        if not sel.removals:
            return model, [], None
        entries = self.apply(model, graph, groups, _Selection(sel.removals, sel.saved_macs))
        return model, entries, now - sel.saved_ms * scale * eff

    def _options(
        self,
        graph: PruningGraph,
        groups: list[PrunableGroup],
        scores: list[torch.Tensor],
        table: LatencyTable,
    ) -> list[Option]:
        """Every group with its scores, floor and (channel groups) its latency curve."""
        options = []
        for g, sc in zip(groups, scores, strict=True):
            keep = self._keep_min(g)
            curve = None
            if g.unit == "channel":
                layers = member_layers(
                    ((m.name, m.module) for m in g.producers),
                    ((m.name, m.module) for m in g.consumers),
                    graph.in_shapes,
                    ((m.name, m.module) for m in g.norms),
                )
                if layers:
                    curve = group_curve(layers, g.size, keep, table)
            options.append(Option(g, sc, keep, curve))
        return options

    # ------------------------------------------------------------ one cut

    def cut(
        self, model: nn.Module, target_macs: float, max_count: int | None
    ) -> tuple[nn.Module, list[dict[str, object]]]:
        """Prune ``model`` towards ``target_macs`` (returns the pruned model and plan entries)."""
        entries: list[dict[str, object]] = []
        for _ in range(_PASSES):
            macs, _ = self.ctx.cost(model)
            need = macs - target_macs
            if need <= 0.01 * target_macs:
                break
            graph = self._graph(model)
            groups = graph.groups()
            scores = self.scores(model, graph, groups)
            rankings = (
                ["score", "score_per_mac"] if self.cfg.ranking == "auto" else [self.cfg.ranking]
            )
            best: tuple[float, nn.Module, list[dict[str, object]]] | None = None
            for ranking in rankings:
                sel = self.select(groups, scores, ranking, need, max_count)
                if not sel.removals:
                    continue
                if len(rankings) == 1:
                    best = (0.0, model, self.apply(model, graph, groups, sel))
                    break
                trial = copy.deepcopy(model)
                tgraph = self._graph(trial)
                tgroups = tgraph.groups()
                e = self.apply(trial, tgraph, tgroups, sel)
                top1, _ = self.ctx.val_accuracy(trial, max_batches=self.cfg.calibration_batches)
                if best is None or top1 > best[0]:
                    best = (top1, trial, e)
            if best is None:
                break
            model = best[1]
            entries.extend(best[2])
            max_count = None  # the count bound applies to the first pass only
        return model, entries

    # ------------------------------------------------------------ the stage

    def run(self, model: nn.Module, start_step: int = 0) -> nn.Module:
        """Prune ``model`` along the schedule; ``start_step`` > 0 resumes a checkpointed run
        whose first ``start_step`` steps are already in ``model`` and the context."""
        ctx, K = self.ctx, self.cfg.steps
        schedule = self._schedule()
        for k in range(start_step, K):
            ctx.check_cancel()
            macs, _ = ctx.cost(model)
            if ctx.reached_targets(macs):
                break
            now_ms = ctx.latency_now_ms
            aim = self._aim(model, k, macs, now_ms, schedule)
            if aim.asks_nothing and k < K - 1:
                # An earlier step went past this point of the schedule (a measured latency
                # can fall by more than predicted): the next point asks for more.
                continue
            model, ended = self._step(model, k, macs, now_ms, aim)
            if ended is not None:
                ctx.emit(STAGE, K, K, message=f"{ended}; keeping last accepted model")
                break
        macs, _ = ctx.cost(model)
        self._note_shortfall(macs)
        ctx.emit(STAGE, K, K, macs=macs)
        return model

    def _schedule(self) -> _Schedule:
        ctx, cfg = self.ctx, self.cfg
        target_ms, base_ms = ctx.target_latency_ms, ctx.base_latency_ms
        return _Schedule(
            fractions=decay_schedule(ctx.config.target_macs or 1.0, cfg.steps),
            ms_fractions=(
                decay_schedule(min(1.0, target_ms / base_ms), cfg.steps)
                if target_ms is not None and base_ms
                else None
            ),
            ratios=paper_ratios(cfg.steps, cfg.paper_alpha, cfg.paper_beta),
        )

    def _aim(
        self,
        model: nn.Module,
        k: int,
        macs: float,
        now_ms: float | None,
        schedule: _Schedule,
    ) -> _Aim:
        """Step ``k``'s cut: the MACs and milliseconds between the model now and the step's
        targets on the schedule (and, for the paper's schedule, its channel count)."""
        ctx, cfg = self.ctx, self.cfg
        target, target_ms, base_ms = ctx.target_macs, ctx.target_latency_ms, ctx.base_latency_ms
        max_count = None
        if cfg.schedule == "decay":
            step_target = max(target, schedule.fractions[k] * ctx.base_macs) if target else None
        else:
            step_target = target
            max_count = self._count_for_ratio(model, schedule.ratios[k])
        step_ms = None
        if target_ms is not None and base_ms is not None:
            # Aim below the target by the noise ``reached_latency`` demands it be cleared by,
            # the whole schedule with it (so its last point is that aim, not the target),
            # else a step could land between the two and leave nothing to cut.
            margin = 1 + max(SPEEDUP_NOISE, ctx.latency_spread / 2)
            aim = target_ms / margin
            step_ms = (
                max(aim, schedule.ms_fractions[k] * base_ms / margin)
                if schedule.ms_fractions is not None and cfg.schedule == "decay"
                else aim
            )
        reduction_ms = 0.0
        if step_ms is not None and now_ms:
            reduction_ms = max(0.0, now_ms - step_ms)
        return _Aim(
            macs_target=step_target is not None,
            ms_target=step_ms is not None and bool(now_ms),
            reduction=macs - step_target if step_target is not None else 0.0,
            reduction_ms=reduction_ms,
            max_count=max_count,
        )

    def _step(
        self, model: nn.Module, k: int, macs: float, now_ms: float | None, aim: _Aim
    ) -> tuple[nn.Module, str | None]:
        """One schedule step: cut, recover, evaluate; over the budget, roll back and retry
        with half the cut. With a latency target a kept step must also measure a saving
        (``_timed_faster``): a cut the deployment runs slower (narrow widths that fall off a
        kernel's fast path) or no faster costs accuracy for nothing, and is rolled back and
        retried the same way.
        Returns the model to go on with and, when the step was not kept, why the stage
        ends."""
        ctx = self.ctx
        snapshot = copy.deepcopy(model)
        ended = "accuracy budget reached"
        for attempt in range(self.cfg.retries + 1):
            pruned, entries, predicted = self._cut_for(model, macs, now_ms, aim)
            if not entries:
                return model, ended if attempt else "nothing left to cut"
            ctx.recover(pruned, ctx.config.recovery.iters_per_step, STAGE)
            top1, top5 = ctx.val_accuracy(pruned)
            tried = f"Filter Prune step {k + 1}"
            if ctx.drop(top1) > ctx.config.max_drop:
                ended = "accuracy budget reached"
                ctx.notes.append(
                    f"{tried}: drop {ctx.drop(top1):.2f} > budget "
                    f"{ctx.config.max_drop:.2f}, rolled back (attempt {attempt + 1})"
                )
            else:
                faster, measured = self._timed_faster(pruned, now_ms, aim, top1, top5, predicted)
                if faster:
                    self._keep(
                        pruned, entries, k, attempt, (top1, top5), predicted, now_ms, measured
                    )
                    return pruned, None
                ended = "cuts no longer measured faster on the deployment"
                row = ctx.steps[-1]
                ctx.notes.append(
                    f"{tried}: measured {row.latency_ms:.3g} ms on the deployment from "
                    f"{now_ms:.3g} ms before it"
                    + (
                        f" (predicted {row.predicted_latency_ms:.3g} ms)"
                        if row.predicted_latency_ms is not None
                        else ""
                    )
                    + f", {row.detail} (attempt {attempt + 1})"
                )
            model = copy.deepcopy(snapshot)
            aim.halve()
        return model, ended

    def _timed_faster(
        self,
        pruned: nn.Module,
        now_ms: float | None,
        aim: _Aim,
        top1: float,
        top5: float,
        predicted: float | None,
    ) -> tuple[bool, float | None]:
        """Whether ``pruned`` may be kept on speed, and its latency if measured here. With a
        latency target it is timed now, and rejected when it is slower than ``now_ms`` by
        more than the measurement's noise (the margin ``reached_latency`` uses), or when the
        cost model predicted a saving well above the noise (twice the margin) and less than a
        quarter of it was measured: the deployment does not run narrower layers faster (a
        model bound by kernel launches: eager PyTorch at batch 32 on an H200 ran ResNet-50 at
        7.5-8.3 ms from 100 % to 9 % of its MACs). A step within the noise otherwise is kept:
        on a busy machine a real saving of a few percent measures either way, and rejecting
        it would end runs that later, larger cuts would have carried to the target. A
        rejected step's row is recorded and the current latency stays ``now_ms``. Without a
        latency target any step may be kept (its row times it, if there is a deployment)."""
        ctx = self.ctx
        if not (aim.ms_target and now_ms):
            return True, None
        ms = ctx.measure_latency(pruned)
        if ms is None:
            return True, ms
        margin = max(SPEEDUP_NOISE, ctx.latency_spread / 2)
        slower = ms > now_ms * (1 + margin)
        promised = now_ms - predicted if predicted is not None else 0.0
        unseen = promised > 2 * margin * now_ms and now_ms - ms < promised / 4
        if not (slower or unseen):
            return True, ms
        ctx.latency_now_ms = now_ms
        ctx.record(
            pruned,
            STAGE,
            top=(top1, top5),
            accepted=False,
            detail=("slower" if slower else "no measured saving") + ": rolled back",
            predicted_ms=predicted,
            measured_ms=ms,
        )
        return False, ms

    def _cut_for(
        self, model: nn.Module, macs: float, now_ms: float | None, aim: _Aim
    ) -> tuple[nn.Module, list[dict[str, object]], float | None]:
        """The pruned copy, its plan entries and (``score_per_ms`` only) its predicted
        latency."""
        if self.cfg.ranking == "score_per_ms":
            return self.cut_by_latency(
                model,
                macs - aim.reduction if aim.macs_target else None,
                now_ms - aim.reduction_ms if aim.ms_target and now_ms else None,
            )
        # Milliseconds to save become MACs at the model's measured ms per MAC.
        need = aim.reduction
        if aim.reduction_ms and now_ms:
            need = max(need, aim.reduction_ms * macs / now_ms)
        pruned, entries = self.cut(model, macs - need, aim.max_count)
        return pruned, entries, None

    def _keep(
        self,
        model: nn.Module,
        entries: list[dict[str, object]],
        k: int,
        attempt: int,
        top: tuple[float, float],
        predicted: float | None,
        before_ms: float | None,
        measured_ms: float | None = None,
    ) -> None:
        """Record an accepted step: plan, dynamics row, the cost model's correction,
        checkpoint and progress."""
        ctx, K = self.ctx, self.cfg.steps
        ctx.plan_ops.extend(entries)
        rec = ctx.record(
            model,
            STAGE,
            top=top,
            detail=f"step {k + 1}/{K}" + (f", retry {attempt}" if attempt else ""),
            predicted_ms=predicted,
            measured_ms=measured_ms,
        )
        if predicted is not None and before_ms and rec.latency_ms is not None:
            self._learn(before_ms, predicted, rec.latency_ms)
        ctx.accepted(model, STAGE, k + 1)
        ctx.emit(
            STAGE,
            k + 1,
            K,
            macs=rec.macs,
            top1=rec.top1,
            message=f"pruned to {rec.macs / ctx.base_macs:.1%} of base MACs",
        )

    def _note_shortfall(self, macs: float) -> None:
        ctx = self.ctx
        if not ctx.reached_target(macs):
            ctx.notes.append(
                f"Filter Prune ended at {macs / ctx.base_macs:.1%} of base MACs, above the "
                f"target {ctx.config.target_macs:.1%} (budget or per-layer caps)"
            )
        if ctx.target_latency_ms is not None and not ctx.reached_latency(ctx.latency_now_ms):
            ctx.notes.append(
                f"Filter Prune ended at {ctx.latency_now_ms:.3g} ms on the deployment, above "
                f"the latency target {ctx.target_latency_ms:.3g} ms (budget, per-layer caps, "
                "widths that save no measurable time, or cuts the deployment did not run faster)"
            )

    def _learn(self, before_ms: float, predicted_ms: float, measured_ms: float) -> None:
        """Fold the step's measured saving into the correction of the next prediction."""
        predicted = before_ms - predicted_ms
        if predicted <= 0:
            return
        measured = max(before_ms - measured_ms, 0.0)
        # Half-way (geometrically) towards what this step measured, and bounded: one noisy
        # measurement on a busy machine must not make the next step cut wildly.
        step = math.sqrt(max(measured / predicted, 1e-3))
        self.ctx.saving_efficiency = min(2.0, max(0.5, self.ctx.saving_efficiency * step))

    def _count_for_ratio(self, model: nn.Module, ratio: float) -> int:
        graph = self._graph(model)
        total = sum(g.size for g in graph.groups())
        return max(1, int(ratio * total))
