"""The recipes users actually run, at IDAP++'s budget: torch-pruning one-shot and iterative
pruning with distilled fine-tuning, and soft filter pruning (SFP).

``bench.quality`` runs them beside IDAP++ on the same base model, data, seeds and total
optimisation steps (the reference run's total for the same seed and target). Each recipe
uses the library's pieces as they are — ``pipeline.compress.prepare`` (model, weights, data
splits), ``pipeline.run.make_context`` (seeding, device, the frozen teacher, the seeded
training-batch stream), ``flow_compress.recovery`` (the one training loop: KD with T and w
from the config, SGD with Nesterov momentum, 5 % warm-up then cosine), ``measure.evaluate``
and ``graph.count_macs_params`` — so only the pruning recipe differs from IDAP++. The
pruning mechanics that need torch-pruning are in ``flow_compress.graph.adapter``
(``StockPruner``, ``prune_to_macs``, ``PruningGraph.zero_units`` and ``prune``).

Recipes (``RECIPES``):

- **torch-pruning one-shot + KD** (``tp_oneshot_<global|uniform>_<taylor|l1|random>``):
  torch-pruning's ``BasePruner`` prunes once, with global ranking or the same ratio per
  layer, the classifier left alone; its ``pruning_ratio`` is searched by bisection on copies
  of the model so that the pruned MACs land on the target (within 0.2 points of MACs ratio;
  a miss of more than 1 point fails the run). Then one distilled fine-tune spends every step.
  Taylor reads cross-entropy gradients of the validation calibration batches, as the
  library's ``taylor`` criterion does.
- **torch-pruning iterative + KD** (``tp_iterative_<taylor|l1>``, global ranking):
  torch-pruning's own schedule — ``iterative_steps`` = the protocol's K and its linear ratio
  scheduler — with a distilled recovery of ``iters_per_step`` after each step (Taylor
  gradients recomputed before each) and a final distilled fine-tune with the remaining
  steps. The ratio is chosen by running the K steps back to back on a copy, without training
  (``prune_to_macs``); training between the steps changes the importances, so the K-th step
  is a one-shot search on the model as it then is, which lands the MACs on the target.
- **SFP** (``sfp``): this project's implementation of soft filter pruning (He et al., "Soft
  Filter Pruning for Accelerating Deep Convolutional Neural Networks", IJCAI 2018); see
  ``run_sfp`` for its choices.

Every recipe's steps are counted by the training loop itself (``recovery_iterations``), so
the equality with the reference is checked, not assumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

Kind = Literal["oneshot", "iterative", "sfp"]
# A one-shot prune that misses the asked MACs ratio by more than this fails the run: the
# comparison is at equal MACs.
ONESHOT_MACS_SLACK = 0.01


@dataclass(frozen=True)
class Recipe:
    """A recipe: its label, its kind, the importance that ranks the channels (a stock
    importance name; ``l2`` for SFP's filter norm) and the ranking scope (global, or the
    same ratio per layer)."""

    label: str
    kind: Kind
    importance: str
    global_pruning: bool


def _oneshot(importance: str, glob: bool) -> Recipe:
    names = {"taylor": "Taylor", "l1": "L1", "random": "random"}
    scope = "global" if glob else "uniform"
    return Recipe(
        f"torch-pruning one-shot {scope} {names[importance]} + KD", "oneshot", importance, glob
    )


RECIPES: dict[str, Recipe] = {
    **{
        f"tp_oneshot_{'global' if glob else 'uniform'}_{imp}": _oneshot(imp, glob)
        for glob in (True, False)
        for imp in ("taylor", "l1", "random")
    },
    "tp_iterative_taylor": Recipe(
        "torch-pruning iterative global Taylor + KD", "iterative", "taylor", True
    ),
    "tp_iterative_l1": Recipe("torch-pruning iterative global L1 + KD", "iterative", "l1", True),
    "sfp": Recipe("SFP (He et al. 2018; this project's implementation) + KD", "sfp", "l2", False),
}


@dataclass(frozen=True)
class RecipeSettings:
    """What a recipe run spends: ``total_steps`` optimisation steps in all (the reference's
    total); for the iterative recipe, ``prune_steps`` torch-pruning steps with
    ``iters_per_step`` recovery steps after each; for SFP, ``sfp_epochs`` zeroing rounds;
    ``tolerance``: how close (fraction of the base MACs) the ratio search aims."""

    total_steps: int
    prune_steps: int
    iters_per_step: int
    sfp_epochs: int
    tolerance: float = 0.002


@dataclass
class RecipeResult:
    """A recipe's outcome: the pruned model (eval mode), its plan entries (replayable with
    ``graph.replay_prune``), costs, accuracies (validation and test, base and pruned, in
    percent), the optimisation steps per stage as the training loop counted them, the MACs
    ratio after each prune step, the timings, and recipe-specific ``details``."""

    model: nn.Module
    entries: list[dict[str, object]]
    base_macs: int
    base_params: int
    macs: int
    params: int
    base_val: tuple[float, float]
    val: tuple[float, float]
    base_test: tuple[float, float]
    test: tuple[float, float]
    recovery_iterations: dict[str, int]
    step_macs_ratios: list[float]
    timings_s: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


def run_recipe(
    name: str, config: Any, weights: Path | None, settings: RecipeSettings
) -> RecipeResult:
    """Run recipe ``name`` on ``config.model`` loaded from ``weights``, to
    ``config.target_macs``, with ``config``'s data, seed, device and recovery settings (the
    KD loss, lr ``recovery.lr`` between steps and ``recovery.final_lr`` for the fine-tune,
    batch size, momentum, weight decay); ``config.truncate`` and ``config.prune.criterion``
    are not used. Raises ``ValueError`` for an unknown name or a budget the recipe cannot
    split, and ``RuntimeError`` when a one-shot prune misses its MACs target by more than one
    point."""
    from flow_compress.arch.surgery import classifier_path
    from flow_compress.measure.evaluate import evaluate
    from flow_compress.pipeline.compress import prepare
    from flow_compress.pipeline.run import make_context

    try:
        recipe = RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}") from None
    if config.target_macs is None:
        raise ValueError("the recipes prune to a MACs target: set target_macs")
    started = time.perf_counter()
    job = prepare(config, weights)
    ctx, student = make_context(job.model, job.data, config)
    ctx.base_val_top1, base_val5 = ctx.val_accuracy(student)
    head = classifier_path(student)
    run = _Run(ctx, recipe, settings, head)
    if recipe.kind == "oneshot":
        model = run.oneshot(student)
    elif recipe.kind == "iterative":
        model = run.iterative(student)
    else:
        model = run.sfp(student)
    model.eval()
    macs, params = ctx.cost(model)
    val = ctx.val_accuracy(model)
    bs = config.data.eval_batch_size
    with ctx.timer("evaluation"):
        base_test = evaluate(ctx.teacher, job.data.loader("test", bs), ctx.device)
        test = evaluate(model, job.data.loader("test", bs), ctx.device)
    timings = {k: round(v, 3) for k, v in ctx.timings.items()}
    timings["total"] = round(time.perf_counter() - started, 3)
    return RecipeResult(
        model=model,
        entries=run.entries,
        base_macs=ctx.base_macs,
        base_params=ctx.base_params,
        macs=macs,
        params=params,
        base_val=(ctx.base_val_top1, base_val5),
        val=val,
        base_test=base_test,
        test=test,
        recovery_iterations={str(s.value): int(n) for s, n in ctx.recovery_iters.items()},
        step_macs_ratios=run.step_macs_ratios,
        timings_s=timings,
        details=run.details,
    )


class _Run:
    """One recipe run on a pipeline ``Context``: the pruning, the recoveries, the records."""

    def __init__(self, ctx: Any, recipe: Recipe, settings: RecipeSettings, head: str) -> None:
        self.ctx = ctx
        self.recipe = recipe
        self.settings = settings
        self.head = head
        self.cfg = ctx.config
        self.entries: list[dict[str, object]] = []
        self.step_macs_ratios: list[float] = []
        self.details: dict[str, Any] = {"settings": asdict(settings)}

    # ------------------------------------------------------------ shared pieces

    def _ratio(self, model: nn.Module) -> float:
        return round(self.ctx.cost(model)[0] / self.ctx.base_macs, 4)

    def _gradients(self, model: nn.Module) -> None:
        """Cross-entropy gradients of the calibration batches on ``model`` (eval mode), for
        torch-pruning's Taylor importance — what the library's ``taylor`` criterion does."""
        ctx = self.ctx
        model.zero_grad(set_to_none=True)
        model.eval()
        batches = ctx.data.calibration_batches(
            self.cfg.prune.calibration_batches, self.cfg.data.eval_batch_size
        )
        with ctx.timer("scoring"):
            for x, y in batches:
                F.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device)).backward()

    def _search(self, model: nn.Module, importance: str, glob: bool, steps: int) -> Any:
        """torch-pruning's ratio that lands ``model``'s MACs on the target (a pruned copy)."""
        from flow_compress.graph.adapter import prune_to_macs

        if importance == "taylor":
            self._gradients(model)
        try:
            with self.ctx.timer("ratio_search"):
                return prune_to_macs(
                    model,
                    self.ctx.example,
                    float(self.ctx.target_macs),
                    importance,
                    global_pruning=glob,
                    ignored=[self.head],
                    iterative_steps=steps,
                    max_pruning_ratio=self.cfg.prune.max_layer_ratio,
                    round_to=self.cfg.prune.round_to,
                    tolerance=self.settings.tolerance,
                    seed=self.cfg.seed,
                )
        finally:
            model.zero_grad(set_to_none=True)

    def _finetune(self, model: nn.Module, iters: int) -> None:
        from flow_compress.schema import Stage

        self.ctx.recover(model, iters, Stage.FINAL_FINE_TUNE, lr=self.cfg.recovery.final_lr)

    # ------------------------------------------------------------ one-shot

    def oneshot(self, model: nn.Module) -> nn.Module:
        """One torch-pruning prune to the MACs target, then one distilled fine-tune of every
        step."""
        r = self.recipe
        cut = self._search(model, r.importance, r.global_pruning, 1)
        ratio = cut.macs / self.ctx.base_macs
        asked = float(self.cfg.target_macs)
        self.details.update(pruning_ratio=cut.pruning_ratio, search_trials=cut.trials)
        if abs(ratio - asked) > ONESHOT_MACS_SLACK:
            raise RuntimeError(
                f"torch-pruning's one-shot prune reached {ratio:.1%} of the MACs, not the asked "
                f"{asked:.1%} ± {ONESHOT_MACS_SLACK:.0%} ({cut.trials} ratios tried)"
            )
        pruned = cut.model
        self.entries += cut.entries
        self.step_macs_ratios.append(round(ratio, 4))
        self._finetune(pruned, self.settings.total_steps)
        return pruned

    # ------------------------------------------------------------ iterative

    def iterative(self, model: nn.Module) -> nn.Module:
        """torch-pruning's iterative schedule, a distilled recovery after each step, and a
        final distilled fine-tune with the steps left."""
        from flow_compress.graph.adapter import PruningGraph, StockPruner
        from flow_compress.schema import Stage

        s, r, ctx = self.settings, self.recipe, self.ctx
        final = s.total_steps - s.prune_steps * s.iters_per_step
        if final < 0:
            raise ValueError(
                f"{s.prune_steps} steps × {s.iters_per_step} recovery steps exceed the budget "
                f"of {s.total_steps}"
            )
        pruner = None
        if s.prune_steps > 1:  # one step is the last step alone: nothing to estimate
            estimate = self._search(model, r.importance, r.global_pruning, s.prune_steps)
            self.details.update(
                pruning_ratio=estimate.pruning_ratio,
                search_trials=estimate.trials,
                estimated_macs_ratio=round(estimate.macs / ctx.base_macs, 4),
            )
            del estimate  # only its ratio is used: the real steps train in between
            graph = PruningGraph(model, ctx.example, ignored=[model.get_submodule(self.head)])
            pruner = StockPruner(
                graph,
                r.importance,
                global_pruning=r.global_pruning,
                pruning_ratio=self.details["pruning_ratio"],
                iterative_steps=s.prune_steps,
                max_pruning_ratio=self.cfg.prune.max_layer_ratio,
                round_to=self.cfg.prune.round_to,
            )
        for k in range(s.prune_steps):
            if pruner is not None and k < s.prune_steps - 1:
                if r.importance == "taylor":
                    self._gradients(model)
                with ctx.timer("surgery"):
                    self.entries += pruner.step()
                model.zero_grad(set_to_none=True)
            else:
                # The training between steps moved the importances away from the estimate,
                # so torch-pruning's last scheduled step would land off the MACs the
                # comparison is at: the last step prunes what is left to the target instead,
                # with the same importance (a one-shot search on the current model).
                cut = self._search(model, r.importance, r.global_pruning, 1)
                self.entries += cut.entries
                self.details["last_step_ratio"] = cut.pruning_ratio
                model = cut.model
            ctx.recover(model, s.iters_per_step, Stage.FILTER_PRUNE)
            self.step_macs_ratios.append(self._ratio(model))
        self._finetune(model, final)
        return model

    # ------------------------------------------------------------ SFP

    def sfp(self, model: nn.Module) -> nn.Module:
        """Soft filter pruning (He et al. 2018), this project's implementation.

        Choices, and why:

        - *Units and ratio.* Every channel group stage 1 could prune (DepGraph-coupled
          channels, the classifier's outputs excluded) loses the same fraction of its
          channels — SFP's single pruning rate for all layers. The fraction is torch-pruning's
          uniform ratio that lands the pruned MACs on the target (``prune_to_macs`` with the
          same ratio per layer): SFP fixes a rate, the comparison fixes MACs.
        - *Criterion.* The L2 norm of the unit's filters, summed in squares over every
          producer of a coupled group (removing the unit removes all of them), lowest
          zeroed — SFP's filter norm extended to coupled channels.
        - *Zeroing during training* (``PruningGraph.zero_units(..., whole=False)``): the
          filters and their biases only, as in the paper. The BatchNorm after a zeroed filter
          then outputs its shift β; where β > 0 the ReLU passes gradient back through BN's
          scale γ and the filter regrows, which is what makes SFP soft. (Zeroing β as well
          would put the ReLU at 0, whose gradient is 0: nothing would ever regrow.)
        - *Epochs.* SFP zeroes once per epoch; the benchmark's budget is a fraction of an
          epoch on Fashion-MNIST, so an "epoch" is a fixed chunk of
          ``total_steps // sfp_epochs`` steps. Zeroing happens before the first step (as the
          paper's code masks before training) and after each chunk, inside one distilled
          fine-tune of ``total_steps`` (one warm-up + cosine schedule; the recovery loop's
          ``on_iter``), so no step is spent outside it.
        - *The last chunk, and removal.* At the start of the last chunk the lowest-norm units
          are zeroed whole (``whole=True``: the filters, BN's β and running mean too, so they
          output exact zeros) and that selection is held — re-zeroed after every step — to
          the end; then the units are removed for real through the adapter's pruning. A
          soft-zeroed filter leaves BN's constant β behind, which removal would drop (and
          which cannot be folded exactly into a padded consumer convolution); dropping it
          without training after it cost most of the accuracy in a smoke run (20 % top-1 on
          Fashion-MNIST at 25 % MACs), so the network spends its last chunk adapting to
          the structure it will have — a departure from the paper, which prunes after the
          last soft epoch. ``details["removal_max_abs_diff"]``
          records how far the removal moved the logits on validation inputs (float error for
          BatchNorm networks); the accuracy reported is the removed model's.
        """
        from flow_compress.graph import PruningGraph

        ctx, s = self.ctx, self.settings
        cut = self._search(model, "l1", False, 1)
        graph = PruningGraph(model, ctx.example, ignored=[model.get_submodule(self.head)])
        groups = [g for g in graph.groups() if g.unit == "channel"]
        owner = {p.name: g for g in groups for p in g.producers}
        counts: dict[str, int] = {}
        for entry in cut.entries:
            g = owner.get(str(entry["root"]))
            if g is None:
                raise RuntimeError(f"torch-pruning pruned {entry['root']}, which no group owns")
            counts[g.root_name] = len(entry["idxs"])  # type: ignore[arg-type]
        del cut
        by_name = {g.root_name: g for g in groups}
        self.details.update(
            layer_ratio=round(
                sum(counts.values()) / max(1, sum(by_name[n].size for n in counts)), 4
            ),
            groups_pruned=len(counts),
        )
        chunk = max(1, s.total_steps // max(1, s.sfp_epochs))
        chosen: dict[str, list[int]] = {}

        # The last chunk holds the final selection fixed (see the docstring).
        hard_from = max(0, s.total_steps - chunk)

        def zero(whole: bool) -> None:
            with ctx.timer("surgery"):
                for name, n in counts.items():
                    g = by_name[name]
                    norms = filter_norms(g)
                    idxs = torch.argsort(norms, stable=True)[:n].tolist()
                    graph.zero_units(g, idxs, whole=whole)
                    chosen[name] = sorted(int(i) for i in idxs)
            self.details["zeroing_rounds"] = self.details.get("zeroing_rounds", 0) + 1

        def hold() -> None:
            # Momentum would move the frozen units off zero: re-zero them after every step.
            for name, idxs in chosen.items():
                graph.zero_units(by_name[name], idxs, whole=True)

        def on_iter(i: int, _loss: float) -> None:
            done = i + 1
            if done == hard_from:
                zero(whole=True)
            elif done > hard_from:
                hold()
            elif done % chunk == 0:
                zero(whole=False)

        zero(whole=hard_from == 0)
        self._recover_with(model, s.total_steps, on_iter)
        hold()
        model.eval()
        probe = ctx.data.sample_inputs(min(64, ctx.config.data.eval_batch_size)).to(ctx.device)
        with torch.no_grad():
            before = model(probe)
        with ctx.timer("surgery"):
            for name, idxs in chosen.items():
                self.entries.append(graph.prune(by_name[name], idxs))
            graph.verify(list(chosen))
        with torch.no_grad():
            after = model(probe)
        self.details["removal_max_abs_diff"] = float((after - before).abs().max())
        self.details["chunk_steps"] = chunk
        self.step_macs_ratios.append(self._ratio(model))
        return model

    def _recover_with(
        self, model: nn.Module, iters: int, on_iter: Callable[[int, float], None]
    ) -> None:
        """The final distilled fine-tune (``Context.recover``) with ``on_iter`` called after
        every step."""
        from flow_compress.schema import Stage

        self.ctx.recover(
            model, iters, Stage.FINAL_FINE_TUNE, lr=self.cfg.recovery.final_lr, on_iter=on_iter
        )


def filter_norms(group: Any) -> torch.Tensor:
    """Per root unit of a channel group: the L2 norm of its filters over every producer
    (conv/linear whose output channels the group removes), ``sqrt(Σ_producers ‖W[c]‖²)``."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for member in group.producers:
        w = member.module.weight.detach()
        sq = w.flatten(1).double().pow(2).sum(dim=1).cpu()
        for i, r in zip(member.idxs, member.root_idxs, strict=True):
            if 0 <= r < group.size:
                total[r] += sq[i]
    return total.sqrt()


def budget_split(recipe: Recipe, settings: RecipeSettings) -> dict[str, int]:
    """The optimisation steps ``recipe`` plans per stage (what ``recovery_iterations`` must
    then show): every step in the fine-tune, or K recoveries plus the rest."""
    from flow_compress.schema import Stage

    if recipe.kind == "iterative":
        prune = settings.prune_steps * settings.iters_per_step
        return {
            Stage.FILTER_PRUNE.value: prune,
            Stage.FINAL_FINE_TUNE.value: settings.total_steps - prune,
        }
    return {Stage.FINAL_FINE_TUNE.value: settings.total_steps}


__all__ = [
    "RECIPES",
    "Recipe",
    "RecipeResult",
    "RecipeSettings",
    "budget_split",
    "filter_norms",
    "run_recipe",
]
