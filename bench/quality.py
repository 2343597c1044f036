"""Quality at equal cost: IDAP++ against torch-pruning's stock criteria.

    python -m bench.quality [--quick|--full] [--out DIR] [options]

Every method compresses the same base model (trained once with the library's ``train`` and
cached) to the same MACs targets through the *same* pipeline: the same stage-1 schedule
(steps, decay shape, global ranking rule, per-layer caps), the same distillation recovery,
the same seeds and data. Methods:

- ``idap_full``: IDAP++ as shipped: divergence scores, stage 1, stage 2 (layer truncation),
  final fine-tune.
- ``idap_stage1``: divergence scores, stage 1 and the final fine-tune; no truncation.
- ``l1`` / ``taylor`` / ``random``: torch-pruning's ``GroupMagnitudeImportance(p=1)``,
  ``GroupTaylorImportance`` and ``RandomImportance`` in place of the divergence score
  (``PruneConfig.criterion``); no truncation.

and the recipes users actually run, outside IDAP++'s pipeline (``bench.recipes``), on the
same base model, data, seeds and distillation settings:

- ``tp_oneshot_<global|uniform>_<taylor|l1|random>``: torch-pruning's own pruner, once, to
  the MACs target (its ratio found by bisection), then one distilled fine-tune of every step;
- ``tp_iterative_<taylor|l1>``: torch-pruning's iterative schedule (K steps, its linear
  ratio scheduler) with a distilled recovery after each step, then a distilled fine-tune;
- ``sfp``: this project's implementation of soft filter pruning (He et al. 2018) during one
  distilled fine-tune, the zeroed filters removed at the end.

``--methods`` chooses among them (``pipeline`` and ``recipes`` name the two families).

Equal budget: stage 2 spends ``trunc_iters`` optimisation steps per candidate block it tries,
a number known only after the run. So for each (seed, target) ``idap_full`` runs first, and
every other method's final fine-tune is lengthened by exactly the steps ``idap_full`` spent in
stage 2; every recipe spends ``idap_full``'s total (without the reference, the protocol's
stage-1 and fine-tune steps) and prunes to the MACs ratio ``idap_full`` reached (at most the
target: stage 2 may end below it). Every run's report records its steps per stage;
``results.json`` holds the totals and ``budget_equal`` says whether they matched for each
(seed, target).

The accuracy budget ``max_drop`` is lifted (100 points) by default: with a budget, a weak
criterion's rollbacks would stop it early at a *larger* model, and the comparison would no
longer be at equal cost. Without rollbacks the stage-1 schedule is identical for every method.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    add_base_model_args,
    choose_protocol,
    command_line,
    ensure_base_model,
    figure,
    fmt_mean_std,
    log,
    machine,
    machine_lines,
    make_parser,
    md_table,
    mean_std,
    parse_floats,
    parse_ints,
    train_config,
    write_json,
    write_text,
)
from bench.recipes import RECIPES, RecipeSettings

NAME = "quality"
REFERENCE = "idap_full"
BASELINES = ("l1", "taylor", "random")


@dataclass(frozen=True)
class Method:
    """One compared method: the score used in stage 1 and whether stage 2 runs; for a
    recipe (``bench.recipes``, outside the pipeline), its importance and ``recipe`` set."""

    label: str
    criterion: str
    stage2: bool
    recipe: bool = False


METHODS: dict[str, Method] = {
    "idap_full": Method("IDAP++ (full)", "divergence", True),
    "idap_stage1": Method("IDAP++ stage 1 only", "divergence", False),
    "l1": Method("L1 magnitude (torch-pruning)", "l1", False),
    "taylor": Method("Taylor (torch-pruning)", "taylor", False),
    "random": Method("random (torch-pruning)", "random", False),
    **{
        name: Method(spec.label, spec.importance, False, recipe=True)
        for name, spec in RECIPES.items()
    },
}
# The methods that run IDAP++'s pipeline (one shared stage-1 schedule), and the recipes.
PIPELINE = tuple(m for m, spec in METHODS.items() if not spec.recipe)
RECIPE_METHODS = tuple(m for m, spec in METHODS.items() if spec.recipe)


@dataclass(frozen=True)
class Protocol:
    """The settings shared by every method (only ``criterion``, ``truncate.enabled`` and the
    final fine-tune's length differ between methods)."""

    targets: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: int
    iters_per_step: int
    trunc_iters: int
    final_iters: int
    max_layers: int
    n_try: int
    tau: float
    batch_size: int
    lr: float
    max_train_samples: int | None
    max_eval_samples: int | None
    calibration_batches: int
    max_drop: float
    ranking: str | None  # None: the library's default (PruneConfig.ranking)
    schedule: str
    consumer_weighting: bool = False
    # SFP's zeroing rounds ("epochs"): its fine-tune is cut into this many equal chunks.
    sfp_epochs: int = 10
    # How close (fraction of the base MACs) the recipes' ratio search aims at the target.
    ratio_tolerance: float = 0.002


QUICK = Protocol(
    targets=(0.25,),
    seeds=(0,),
    steps=4,
    iters_per_step=30,
    trunc_iters=20,
    final_iters=120,
    max_layers=1,
    n_try=2,
    tau=0.5,
    batch_size=64,
    lr=0.01,
    max_train_samples=None,
    max_eval_samples=2000,
    calibration_batches=2,
    max_drop=100.0,
    ranking=None,
    schedule="decay",
    # Quick mode's 260-odd steps in ten rounds would zero half of every layer each 26 steps,
    # too few to recover in between (the paper's rounds are whole ImageNet epochs); fewer,
    # longer rounds did better (bench/results/quality-tried/README.md, "SFP's rounds").
    sfp_epochs=2,
)

# The library's defaults (PruneConfig / TruncateConfig / RecoveryConfig) on the whole data.
FULL = Protocol(
    targets=(0.5, 0.35, 0.25, 0.15),
    seeds=(0, 1),
    steps=8,
    iters_per_step=150,
    trunc_iters=100,
    final_iters=600,
    max_layers=3,
    n_try=3,
    tau=0.5,
    batch_size=128,
    lr=0.01,
    max_train_samples=None,
    max_eval_samples=None,
    calibration_batches=4,
    max_drop=100.0,
    ranking=None,
    schedule="decay",
)


@dataclass(frozen=True)
class Model:
    """What is compressed: architecture, data reference and input format."""

    arch: str
    dataset: str
    in_chans: int
    input_size: int
    device: str = "auto"


# --------------------------------------------------------------------------- configs


def base_raw_config(proto: Protocol, model: Model, target: float, seed: int) -> dict[str, Any]:
    """The ``CompressionConfig`` fields every method shares for one (target, seed)."""
    return {
        "model": model.arch,
        "dataset": model.dataset,
        "in_chans": model.in_chans,
        "input_size": model.input_size,
        "target_macs": target,
        "max_drop": proto.max_drop,
        "device": model.device,
        "seed": seed,
        "prune": {
            "steps": proto.steps,
            "schedule": proto.schedule,
            **({} if proto.ranking is None else {"ranking": proto.ranking}),
            "consumer_weighting": proto.consumer_weighting,
            "calibration_batches": proto.calibration_batches,
        },
        "truncate": {
            "max_layers": proto.max_layers,
            "n_try": proto.n_try,
            "tau": proto.tau,
            "calibration_batches": proto.calibration_batches,
        },
        "recovery": {
            "iters_per_step": proto.iters_per_step,
            "trunc_iters": proto.trunc_iters,
            "final_iters": proto.final_iters,
            "batch_size": proto.batch_size,
            "lr": proto.lr,
            "final_lr": proto.lr,
        },
        "data": {
            "max_train_samples": proto.max_train_samples,
            "max_eval_samples": proto.max_eval_samples,
        },
        # Quality is what this benchmark measures: exports and timings are bench.latency's.
        "export": {"formats": []},
        "latency": {"enabled": False},
    }


def method_config(raw: dict[str, Any], method: str, extra_final_iters: int) -> Any:
    """``raw`` with ``method``'s criterion and stage-2 switch, and ``extra_final_iters`` more
    steps in the final fine-tune (the stage-2 steps of the reference run)."""
    from flow_compress.config import CompressionConfig

    spec = METHODS[method]
    cfg = json.loads(json.dumps(raw))  # a deep copy of plain data
    cfg["prune"]["criterion"] = spec.criterion
    cfg["truncate"]["enabled"] = spec.stage2
    cfg["recovery"]["final_iters"] += extra_final_iters
    return CompressionConfig.model_validate(cfg)


# --------------------------------------------------------------------------- one run


NOT_RUN = "not run (no saved report with this config)"


def error_row(method: str, target: float, seed: int, error: str) -> dict[str, Any]:
    """The row of a run that failed or was not run: a result of the grid, not a crash."""
    return {
        "method": method,
        "label": METHODS[method].label,
        "target": target,
        "seed": seed,
        "error": error,
    }


def schedule_facts(report: Any) -> dict[str, Any]:
    """How the stage-1 schedule was walked, read from a report: steps attempted (accepted
    steps plus rolled-back attempts), MACs ratio after each accepted step, and stage 2."""
    fp = [s for s in report.steps if s.stage == "Filter Prune"]
    rollbacks = [
        n for n in report.notes if n.startswith("Filter Prune step") and "rolled back" in n
    ]
    base_macs = report.base.macs
    return {
        "filter_prune_accepted": len(fp),
        "filter_prune_rollbacks": len(rollbacks),
        "filter_prune_attempts": len(fp) + len(rollbacks),
        "step_macs_ratios": [round(s.macs / base_macs, 4) for s in fp],
        "layers_removed": sum(1 for s in report.steps if s.stage == "Layer Trunc"),
        "final_finetune_kept": any(
            s.stage == "Final Fine-Tune" and s.accepted for s in report.steps
        ),
    }


def summarise_run(
    method: str, target: float, seed: int, report: Any, wall_s: float
) -> dict[str, Any]:
    """One row of ``results.json`` from a ``CompressionReport``."""
    iters = dict(report.recovery_iterations)
    return {
        "method": method,
        "label": METHODS[method].label,
        "target": target,
        "seed": seed,
        "top1": report.pruned.top1,
        "top5": report.pruned.top5,
        "base_top1": report.base.top1,
        "drop": report.top1_drop,
        "macs": report.pruned.macs,
        "base_macs": report.base.macs,
        "macs_ratio": round(report.macs_ratio, 5),
        "params": report.pruned.params,
        "base_params": report.base.params,
        "params_ratio": round(report.params_ratio, 5),
        "recovery_iterations": iters,
        "total_steps": sum(iters.values()),
        "final_iters_configured": report.config.recovery.final_iters,
        "val_top1_last_step": report.steps[-1].top1 if report.steps else None,
        **schedule_facts(report),
        "ranking": report.config.prune.ranking,
        "timings_s": dict(report.timings_s),
        # Seconds per optimisation step: the pruned structure, not only its MACs, sets it.
        "recovery_s_per_step": round(
            report.timings_s.get("recovery", 0.0) / max(1, sum(iters.values())), 4
        ),
        "wall_s": round(wall_s, 2),
    }


def run_one(
    method: str,
    target: float,
    seed: int,
    cfg: Any,
    weights: Path | None,
    work_dir: Path,
    reports_dir: Path | None,
    reuse: bool = False,
) -> tuple[dict[str, Any], Any]:
    # ``weights`` None means "summarise only": saved reports are used, nothing is compressed.
    """Compress once; returns the run's summary row and its report (None when it raised:
    a failing method is a result, recorded with its ``error``, not a crash of the grid).

    With ``reuse``, a report saved earlier under ``reports_dir`` for the same run id *and an
    identical config* is taken instead of compressing again (an interrupted grid resumes, and
    cells computed on another machine merge); its ``wall_s`` is the report's own total."""
    from flow_compress.pipeline import compress

    run_id = f"{method}-t{target:g}-s{seed}"
    if (reuse or weights is None) and reports_dir is not None:
        kept = reusable_report(reports_dir / f"{run_id}.json", cfg)
        if kept is not None:
            log(f"quality: {run_id}: reusing its saved report (same config)")
            wall = float(kept.timings_s.get("total", 0.0))
            return summarise_run(method, target, seed, kept, wall), kept
    if weights is None:  # summarising saved reports only
        log(f"quality: {run_id}: no saved report with this config")
        return error_row(method, target, seed, NOT_RUN), None
    log(f"quality: {run_id} (final fine-tune {cfg.recovery.final_iters} steps)")
    start = time.perf_counter()
    try:
        report = compress(cfg, weights=weights, out_dir=work_dir / run_id, overwrite=True)
    except Exception as exc:
        row = error_row(method, target, seed, f"{type(exc).__name__}: {exc}")
        log(f"quality: {run_id} failed: {row['error']}")
        return row, None
    row = summarise_run(method, target, seed, report, time.perf_counter() - start)
    if reports_dir is not None:
        write_json(reports_dir / f"{run_id}.json", report.model_dump(mode="json"))
        # The plan (kept channels per layer, blocks replaced) rebuilds the pruned architecture
        # with flow_compress.plan.rebuild; it is small, the weights are not kept.
        shutil.copyfile(work_dir / run_id / "plan.json", reports_dir / f"{run_id}.plan.json")
    log(
        f"quality: {run_id}: top-1 {row['top1']:.2f} at {row['macs_ratio']:.1%} MACs, "
        f"{row['total_steps']} steps, {row['wall_s']:.0f} s"
    )
    return row, report


def reusable_report(path: Path, cfg: Any) -> Any:
    """The ``CompressionReport`` at ``path`` if it exists and was made with exactly ``cfg``."""
    from flow_compress.report import load_report

    if not path.is_file():
        return None
    try:
        report = load_report(path)
    except Exception:  # a torn or foreign file is recomputed, not trusted
        return None
    if report.config.model_dump(mode="json") != cfg.model_dump(mode="json"):
        return None
    return report


def saved_base_model(cfg: Any, out: Path) -> Any:
    """The base model's description for ``--summarise``: ``OUT/base_train.json`` (written by
    the run that made the reports), else the cache entry's ``train.json``; no weights."""
    from bench.common import CACHE_ROOT, BaseModel, cache_key

    key = cache_key(cfg)
    for path in (out / "base_train.json", CACHE_ROOT / key / "train.json"):
        if path.is_file():
            info = json.loads(path.read_text())
            return BaseModel(path, f"described by {path.name} (summarised)", key, info)
    return BaseModel(out, "unknown (summarised; no train.json found)", key, None)


def load_saved_environment(reports_dir: Path) -> dict[str, Any]:
    """``environment`` of the first saved report, in ``machine()``'s shape."""
    for path in sorted(reports_dir.glob("*-s*.json")):
        if path.name.endswith(".plan.json"):
            continue
        env: dict[str, Any] = json.loads(path.read_text()).get("environment", {})
        return {**env, "torch_threads": "per cell", "loadavg_1m_5m_15m": None}
    return {}


def run_cell(
    proto: Protocol,
    model: Model,
    weights: Path | None,
    methods: Sequence[str],
    seed: int,
    target: float,
    reports_dir: Path | None,
    reuse: bool = False,
) -> list[dict[str, Any]]:
    """Every method at one (seed, target), ``idap_full`` first (see ``run_grid``)."""
    ordered = sorted(methods, key=lambda m: m != REFERENCE)
    raw = base_raw_config(proto, model, target, seed)
    rows: list[dict[str, Any]] = []
    extra = 0
    # Without the reference, a recipe gets what a stock criterion then spends, and aims at
    # the asked target.
    total = proto.steps * proto.iters_per_step + proto.final_iters
    recipe_raw = raw
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for method in ordered:
            if METHODS[method].recipe:
                settings = RecipeSettings(
                    total_steps=total,
                    prune_steps=proto.steps,
                    iters_per_step=proto.iters_per_step,
                    sfp_epochs=proto.sfp_epochs,
                    tolerance=proto.ratio_tolerance,
                )
                rows.append(
                    run_recipe_one(
                        method, target, seed, recipe_raw, settings, weights, reports_dir, reuse
                    )
                )
                continue
            cfg = method_config(raw, method, 0 if method == REFERENCE else extra)
            row, report = run_one(method, target, seed, cfg, weights, Path(tmp), reports_dir, reuse)
            if method == REFERENCE and report is not None:
                extra = int(report.recovery_iterations.get("Layer Trunc", 0))
                total = int(sum(report.recovery_iterations.values()))
                # Equal cost means the MACs IDAP++ reached, which stage 2 can put below the
                # asked target: a one-shot prune aimed at the target would keep more.
                recipe_raw = {**raw, "target_macs": min(target, round(report.macs_ratio, 5))}
            rows.append(row)
    return rows


def recipe_config(raw: dict[str, Any]) -> Any:
    """The ``CompressionConfig`` a recipe runs with: ``raw`` (data, seed, device, recovery
    settings, target) with stage 2 off; the recipe decides its own pruning and steps."""
    from flow_compress.config import CompressionConfig

    cfg = json.loads(json.dumps(raw))
    cfg["truncate"]["enabled"] = False
    return CompressionConfig.model_validate(cfg)


def recipe_row(method: str, target: float, seed: int, result: Any, wall_s: float) -> dict[str, Any]:
    """One row of ``results.json`` from a ``RecipeResult``, with the fields of
    ``summarise_run``'s rows (a recipe has no stage 2 and no rollbacks)."""
    iters = dict(result.recovery_iterations)
    total = sum(iters.values())
    spec = RECIPES[method]
    base_top1, base_top5 = result.base_test
    return {
        "method": method,
        "label": METHODS[method].label,
        "target": target,
        "seed": seed,
        "top1": result.test[0],
        "top5": result.test[1],
        "base_top1": base_top1,
        "base_top5": base_top5,
        "drop": round(base_top1 - result.test[0], 4),
        "macs": result.macs,
        "base_macs": result.base_macs,
        "macs_ratio": round(result.macs / result.base_macs, 5),
        "params": result.params,
        "base_params": result.base_params,
        "params_ratio": round(result.params / result.base_params, 5),
        "recovery_iterations": iters,
        "total_steps": total,
        "final_iters_configured": iters.get("Final Fine-Tune", 0),
        "val_top1_last_step": round(result.val[0], 3),
        "filter_prune_accepted": len(result.step_macs_ratios),
        "filter_prune_rollbacks": 0,
        "filter_prune_attempts": len(result.step_macs_ratios),
        "step_macs_ratios": result.step_macs_ratios,
        "layers_removed": 0,
        "final_finetune_kept": True,
        "recipe": {
            "kind": spec.kind,
            "importance": spec.importance,
            "scope": "global" if spec.global_pruning else "uniform",
            **result.details,
        },
        "timings_s": dict(result.timings_s),
        "recovery_s_per_step": round(result.timings_s.get("recovery", 0.0) / max(1, total), 4),
        "wall_s": round(wall_s, 2),
    }


def run_recipe_one(
    method: str,
    target: float,
    seed: int,
    raw: dict[str, Any],
    settings: RecipeSettings,
    weights: Path | None,
    reports_dir: Path | None,
    reuse: bool = False,
) -> dict[str, Any]:
    """Run one recipe (``bench.recipes.run_recipe``); returns its row (with an ``error`` when
    it raised). Its record — identity (config, recipe, settings), row, plan entries and the
    machine — is saved as ``reports_dir/<run id>.recipe.json``; with ``reuse`` (or no
    ``weights``: summarising) a saved record of the same identity is taken instead."""
    from bench.recipes import run_recipe
    from flow_compress.measure.environment import environment

    run_id = f"{method}-t{target:g}-s{seed}"
    cfg = recipe_config(raw)
    identity = {
        "config": cfg.model_dump(mode="json"),
        "recipe": method,
        "settings": asdict(settings),
    }
    path = reports_dir / f"{run_id}.recipe.json" if reports_dir is not None else None
    if (reuse or weights is None) and path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:  # a torn file is recomputed, not trusted
            saved = {}
        if saved.get("identity") == identity:
            log(f"quality: {run_id}: reusing its saved record (same config)")
            row: dict[str, Any] = saved["row"]
            return row
    if weights is None:
        log(f"quality: {run_id}: no saved record with this config")
        return error_row(method, target, seed, NOT_RUN)
    log(f"quality: {run_id} ({settings.total_steps} optimisation steps)")
    start = time.perf_counter()
    try:
        result = run_recipe(method, cfg, weights, settings)
    except Exception as exc:
        row = error_row(method, target, seed, f"{type(exc).__name__}: {exc}")
        log(f"quality: {run_id} failed: {row['error']}")
        return row
    row = recipe_row(method, target, seed, result, time.perf_counter() - start)
    if path is not None:
        write_json(
            path,
            {
                "identity": identity,
                "row": row,
                "plan": result.entries,
                "environment": dict(environment()),
            },
        )
    log(
        f"quality: {run_id}: top-1 {row['top1']:.2f} at {row['macs_ratio']:.1%} MACs, "
        f"{row['total_steps']} steps, {row['wall_s']:.0f} s"
    )
    return row


def _cell_in_child(threads: int, *args: Any) -> list[dict[str, Any]]:
    import torch

    # Parallel cells share the machine's cores: without this each would start one thread
    # per core and they would thrash (on a GPU the cores only feed the batches).
    torch.set_num_threads(threads)
    return run_cell(*args)


def run_grid(
    proto: Protocol,
    model: Model,
    weights: Path | None,
    methods: Sequence[str],
    *,
    reports_dir: Path | None = None,
    reuse: bool = False,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Compress ``weights`` with every method at every (seed, target) of ``proto``.

    ``idap_full`` (when among ``methods``) runs first in each (seed, target); the others get
    the optimisation steps it spent in stage 2 added to their final fine-tune, so every run of
    that (seed, target) spends the same number of optimisation steps. Each report is saved as
    ``reports_dir/<method>-t<target>-s<seed>.json`` when ``reports_dir`` is given. Returns one
    summary row per run (``budget_checks`` verifies the equality afterwards).

    ``jobs`` > 1 runs that many (seed, target) cells at once in child processes (each with
    its share of the CPU threads): meant for a GPU, which one cell leaves mostly idle. Results
    do not depend on ``jobs``; wall times per run do, since the cells share the machine.
    """
    cells = [(seed, target) for target in proto.targets for seed in proto.seeds]
    if jobs <= 1 or len(cells) == 1:
        runs: list[dict[str, Any]] = []
        for seed, target in cells:
            runs += run_cell(proto, model, weights, methods, seed, target, reports_dir, reuse)
        return runs
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [
            pool.submit(
                _cell_in_child,
                threads,
                proto,
                model,
                weights,
                methods,
                seed,
                target,
                reports_dir,
                reuse,
            )
            for seed, target in cells
        ]
        return [row for f in futures for row in f.result()]


# --------------------------------------------------------------------------- summary


def budget_checks(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (seed, target): the total optimisation steps of every method and the stage-1
    attempts of every pipeline method, and whether each are all equal (recipes have their
    own schedules, so only their totals are compared)."""
    out = []
    keys = sorted({(r["seed"], r["target"]) for r in runs})
    for seed, target in keys:
        group = [r for r in runs if (r["seed"], r["target"]) == (seed, target) and "error" not in r]
        totals = {r["method"]: r["total_steps"] for r in group}
        attempts = {
            r["method"]: r["filter_prune_attempts"]
            for r in group
            if not METHODS[r["method"]].recipe
        }
        out.append(
            {
                "seed": seed,
                "target": target,
                "total_steps": totals,
                "filter_prune_attempts": attempts,
                "budget_equal": len(set(totals.values())) <= 1,
                "schedule_equal": len(set(attempts.values())) <= 1,
            }
        )
    return out


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds, per (method, target)."""
    rows = []
    done = [r for r in runs if "error" not in r]
    for target in sorted({r["target"] for r in done}, reverse=True):
        for method in METHODS:
            group = [r for r in done if r["method"] == method and r["target"] == target]
            if not group:
                continue
            top1_mean, top1_std = mean_std([r["top1"] for r in group])
            rows.append(
                {
                    "method": method,
                    "label": METHODS[method].label,
                    "target": target,
                    "seeds": [r["seed"] for r in group],
                    "top1_mean": round(top1_mean, 3),
                    "top1_std": None if top1_std is None else round(top1_std, 3),
                    "drop_mean": round(mean_std([r["drop"] for r in group])[0], 3),
                    "macs_ratio_mean": round(mean_std([r["macs_ratio"] for r in group])[0], 4),
                    "macs_mean": round(mean_std([r["macs"] for r in group])[0]),
                    "params_mean": round(mean_std([r["params"] for r in group])[0]),
                    "total_steps": sorted({r["total_steps"] for r in group}),
                    "layers_removed_mean": mean_std([r["layers_removed"] for r in group])[0],
                }
            )
    return rows


def headline(summary: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """IDAP++ (full) at ``target`` against the best stock baseline, the best recipe and the
    base model."""
    at = {r["method"]: r for r in summary if abs(r["target"] - target) < 1e-9}
    ref = at.get(REFERENCE)
    baselines = [at[m] for m in BASELINES if m in at]
    recipes = [at[m] for m in RECIPE_METHODS if m in at]
    if ref is None or not (baselines or recipes):
        return None
    recipe = max(recipes, key=lambda r: r["top1_mean"]) if recipes else None
    versus: dict[str, Any] = {
        "best_recipe": recipe["method"] if recipe else None,
        "best_recipe_top1": recipe["top1_mean"] if recipe else None,
        "best_recipe_macs_ratio": recipe["macs_ratio_mean"] if recipe else None,
        "margin_vs_best_recipe": round(ref["top1_mean"] - recipe["top1_mean"], 3)
        if recipe
        else None,
    }
    best = max(baselines or recipes, key=lambda r: r["top1_mean"])
    return {
        **versus,
        "target": target,
        "idap_full_top1": ref["top1_mean"],
        "best_baseline": best["method"],
        "best_baseline_top1": best["top1_mean"],
        "margin_vs_best_baseline": round(ref["top1_mean"] - best["top1_mean"], 3),
        "idap_full_drop": ref["drop_mean"],
        "beats_best_baseline": ref["top1_mean"] >= best["top1_mean"],
        "drop_within_1_point": ref["drop_mean"] <= 1.0,
        "idap_stage1_top1": at["idap_stage1"]["top1_mean"] if "idap_stage1" in at else None,
    }


# --------------------------------------------------------------------------- outputs


def plot_accuracy_vs_macs(
    runs: Sequence[dict[str, Any]], base_top1: float | None, path: Path
) -> None:
    """Top-1 against the MACs actually kept, one line per method (error bars: std over
    seeds); the base model is a dashed line."""
    fig, ax = figure(7.5, 4.8)
    done = [r for r in runs if "error" not in r]
    markers = {"idap_full": "o", "idap_stage1": "s", "l1": "^", "taylor": "v", "random": "x"}
    cycle = "DPh*<>+d1"
    for i, method in enumerate(RECIPE_METHODS):
        markers[method] = cycle[i % len(cycle)]
    for method, spec in METHODS.items():
        pts = []
        for target in sorted({r["target"] for r in done}):
            group = [r for r in done if r["method"] == method and r["target"] == target]
            if group:
                top_mean, top_std = mean_std([r["top1"] for r in group])
                macs_mean = mean_std([r["macs_ratio"] for r in group])[0]
                pts.append((100 * macs_mean, top_mean, top_std or 0.0))
        if pts:
            xs, ys, es = zip(*pts, strict=True)
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                marker=markers.get(method, "o"),
                capsize=3,
                label=spec.label,
                # Recipes outside the pipeline dashed, so the two families read apart.
                linestyle="--" if spec.recipe else "-",
            )
    if base_top1 is not None:
        ax.axhline(base_top1, color="0.3", linestyle="--", linewidth=1, label="base model")
    ax.set_xlabel("MACs kept, % of the base model")
    ax.set_ylabel("test top-1, %")
    ax.set_title("Accuracy at equal cost (same optimisation steps)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7 if len(ax.get_legend_handles_labels()[1]) > 8 else 8)
    fig.savefig(path, dpi=120)


def plot_headline(
    summary: Sequence[dict[str, Any]], target: float, base_top1: float | None, path: Path
) -> None:
    """Bars of top-1 per method at ``target`` (error bars: std over seeds)."""
    rows = [r for r in summary if abs(r["target"] - target) < 1e-9]
    if not rows:
        return
    fig, ax = figure(max(7.0, 0.75 * len(rows)), 4.0)
    labels = [
        r["label"].replace(" (torch-pruning)", "\n(torch-pruning)").replace(" + KD", "\n+ KD")
        for r in rows
    ]
    ys = [r["top1_mean"] for r in rows]
    es = [r["top1_std"] or 0.0 for r in rows]
    bars = ax.bar(range(len(rows)), ys, yerr=es, capsize=3, color="tab:blue")
    for bar, row, err in zip(bars, rows, es, strict=True):
        if row["method"] in ("idap_full", "idap_stage1"):
            bar.set_color("tab:orange")
        elif METHODS[row["method"]].recipe:
            bar.set_color("tab:green")
        # The MACs each method really kept: stage 2 may go below the target.
        ax.annotate(
            f"{row['top1_mean']:.2f}\n{row['macs_ratio_mean']:.1%} MACs",
            (bar.get_x() + bar.get_width() / 2, row["top1_mean"] + err),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    lo = min(ys) - max([*es, 0.0]) - 2
    hi = max(ys + ([base_top1] if base_top1 is not None else [])) + 1.5
    ax.set_ylim(max(0.0, lo), min(100.0, hi))
    if base_top1 is not None:
        ax.axhline(base_top1, color="0.3", linestyle="--", linewidth=1, label="base model")
        ax.legend(fontsize=8)
    ax.set_ylabel("test top-1, % (axis does not start at 0)")
    ax.set_title(f"Top-1 at a {target:.0%} MACs target")
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)


def markdown(payload: dict[str, Any]) -> str:
    """RESULTS.md: protocol, the headline table, every target, every run, the machine."""
    proto = payload["protocol"]
    base = payload["base_model"]
    summary = payload["summary"]
    runs = payload["runs"]
    target = payload["headline_target"]
    used = sorted({r["ranking"] for r in runs if "ranking" in r})
    ranking = f"`{'/'.join(used) or '?'}`"
    if proto["ranking"] is None:
        ranking += " (the library's default)"
    lines = [
        f"# Quality at equal cost ({payload['mode']} mode)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Finished: {payload['finished']}, "
        + (
            "rebuilt from the saved reports (`--summarise`)"
            if payload.get("summarised")
            else f"wall time {payload['wall_s'] / 60:.1f} min"
        ),
        "",
        "## Setup",
        "",
        f"- Base model: {payload['model']['arch']} on `{payload['model']['dataset']}` "
        f"({payload['model']['input_size']} px, {payload['model']['in_chans']} channel(s)); "
        f"{base['source']}.",
    ]
    if base.get("train_test_top1") is not None:
        lines.append(
            f"- Base model test top-1 on the full test split (from its train.json): "
            f"{base['train_test_top1']:.2f} %; on the evaluation subset used here: "
            f"{base['eval_top1']:.2f} % ({base['eval_samples']} test images)."
        )
    elif base.get("eval_top1") is not None:
        lines.append(
            f"- Base model test top-1 on the evaluation subset used here: {base['eval_top1']:.2f}"
            f" % ({base['eval_samples']} test images)."
        )
    lines += [
        f"- Targets (fraction of base MACs): {', '.join(f'{t:g}' for t in proto['targets'])}; "
        f"seeds: {', '.join(str(s) for s in proto['seeds'])}.",
        f"- Shared schedule: {proto['steps']} stage-1 steps (`{proto['schedule']}`), ranking "
        f"{ranking}{' with consumer weighting' if proto['consumer_weighting'] else ''}"
        f", {proto['iters_per_step']} recovery steps per prune step, batch "
        f"{proto['batch_size']}, lr {proto['lr']}, KD from the base model (T=4, w=0.7); final "
        f"fine-tune {proto['final_iters']} steps plus, for every method but IDAP++ (full), the "
        f"steps IDAP++ (full) spent in stage 2 ({proto['trunc_iters']} per tried block, at most "
        f"{proto['max_layers']} removals, {proto['n_try']} tries per round, tau "
        f"{proto['tau']}).",
        f"- Accuracy budget max_drop {proto['max_drop']:g} points (lifted, so every method "
        "reaches the same MACs target and no step is rolled back).",
    ]
    if any(METHODS[m].recipe for m in payload["methods"]):
        lines.append(
            "- Recipes outside the pipeline (`bench/recipes.py`) spend IDAP++ (full)'s total "
            "steps with the same KD loss, lr and batch size: torch-pruning one-shot (its ratio "
            "bisected to the MACs target) + one fine-tune of every step; torch-pruning "
            f"iterative ({proto['steps']} steps, its linear scheduler, "
            f"{proto['iters_per_step']} recovery steps after each) + a fine-tune of the rest; "
            f"SFP (this project's implementation of He et al. 2018; {proto['sfp_epochs']} "
            "zeroing rounds during one fine-tune, zeroed filters removed at the end)."
        )
    lines += [
        f"- Validation/test subset: {proto['max_eval_samples'] or 'all'} images each; "
        f"calibration: {proto['calibration_batches']} validation batches.",
        "",
    ]
    head = payload.get("headline")
    lines += [f"## Top-1 at {target:.0%} of base MACs", ""]
    rows = [r for r in summary if abs(r["target"] - target) < 1e-9]
    lines.append(
        md_table(
            [
                "method",
                "top-1 % (mean ± std)",
                "Δ vs base",
                "MACs kept",
                "params (M)",
                "optimisation steps",
                "seeds",
            ],
            [
                [
                    r["label"],
                    fmt_mean_std(
                        [
                            x["top1"]
                            for x in runs
                            if x.get("method") == r["method"]
                            and x.get("target") == r["target"]
                            and "error" not in x
                        ]
                    ),
                    f"{-r['drop_mean']:+.2f}",
                    f"{r['macs_ratio_mean']:.1%}",
                    f"{r['params_mean'] / 1e6:.3f}",
                    "/".join(str(s) for s in r["total_steps"]),
                    len(r["seeds"]),
                ]
                for r in rows
            ],
        )
    )
    lines.append("")
    if head is not None:
        verdict = "at or above" if head["beats_best_baseline"] else "below"
        lines += [
            f"IDAP++ (full) is {verdict} the best stock baseline "
            f"({METHODS[head['best_baseline']].label}) by {head['margin_vs_best_baseline']:+.2f}"
            f" points; its drop from the base model is {head['idap_full_drop']:.2f} points "
            f"(goal: ≤ 1.00, {'met' if head['drop_within_1_point'] else 'not met'}).",
            "",
        ]
        if head.get("best_recipe"):
            lines += [
                f"Against the best recipe ({METHODS[head['best_recipe']].label}, "
                f"{head['best_recipe_macs_ratio']:.1%} MACs): "
                f"{head['margin_vs_best_recipe']:+.2f} points.",
                "",
            ]
    lines += ["![top-1 per method](headline.png)", "", "## Every target", ""]
    targets = sorted({r["target"] for r in summary}, reverse=True)
    table_rows = []
    for method, spec in METHODS.items():
        cells = []
        for t in targets:
            match = [r for r in summary if r["method"] == method and r["target"] == t]
            if match:
                m = match[0]
                cells.append(f"{m['top1_mean']:.2f} ({m['macs_ratio_mean']:.1%})")
            else:
                cells.append("–")
        if any(c != "–" for c in cells):
            table_rows.append([spec.label, *cells])
    lines.append(
        md_table(["method", *[f"target {t:.0%}: top-1 (MACs kept)" for t in targets]], table_rows)
    )
    lines += ["", "![accuracy against MACs](accuracy_vs_macs.png)", "", "## Equal budget", ""]
    lines.append(
        md_table(
            ["seed", "target", "optimisation steps per method", "stage-1 steps attempted", "equal"],
            [
                [
                    b["seed"],
                    f"{b['target']:g}",
                    ", ".join(f"{m} {n}" for m, n in b["total_steps"].items()),
                    ", ".join(f"{m} {n}" for m, n in b["filter_prune_attempts"].items()),
                    "yes" if b["budget_equal"] and b["schedule_equal"] else "**no**",
                ]
                for b in payload["budget"]
            ],
        )
    )
    lines += ["", "## Every run", ""]
    lines.append(
        md_table(
            [
                "method",
                "target",
                "seed",
                "top-1",
                "top-5",
                "MACs kept",
                "params kept",
                "blocks removed",
                "steps (prune/trunc/final)",
                "wall s",
            ],
            [
                [
                    r["label"],
                    f"{r['target']:g}",
                    r["seed"],
                    f"{r['top1']:.2f}",
                    f"{r['top5']:.2f}",
                    f"{r['macs_ratio']:.1%}",
                    f"{r['params_ratio']:.1%}",
                    r["layers_removed"],
                    "/".join(
                        str(r["recovery_iterations"].get(k, 0))
                        for k in ("Filter Prune", "Layer Trunc", "Final Fine-Tune")
                    ),
                    f"{r['wall_s']:.0f}",
                ]
                if "error" not in r
                else [
                    r["label"],
                    f"{r['target']:g}",
                    r["seed"],
                    r["error"] if r["error"].startswith("not run") else f"failed: {r['error']}",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
                for r in runs
            ],
        )
    )
    lines += ["", "## Machine", "", *machine_lines(payload["machine"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_methods(text: str) -> list[str]:
    """Method names from a comma-separated list, ``all``, ``pipeline`` and ``recipes``
    expanded (in ``METHODS`` order, each once); unknown names are kept for the caller to
    report."""
    groups = {"all": tuple(METHODS), "pipeline": PIPELINE, "recipes": RECIPE_METHODS}
    out: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        for m in groups.get(item, (item,) if item else ()):
            if m not in out:
                out.append(m)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(NAME, "IDAP++ against stock pruning criteria at equal cost.")
    add_base_model_args(parser)
    g = parser.add_argument_group("protocol (defaults: the mode's)")
    g.add_argument("--targets", type=parse_floats, help="MACs fractions, e.g. 0.5,0.25")
    g.add_argument("--seeds", type=parse_ints, help="compression seeds, e.g. 0,1")
    g.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated subset of {', '.join(METHODS)}; 'pipeline' names "
        f"{', '.join(PIPELINE)}, 'recipes' the recipes, 'all' (the default) every method",
    )
    g.add_argument("--sfp-epochs", type=int, help="SFP's zeroing rounds during its fine-tune")
    g.add_argument("--steps", type=int, help="stage-1 steps K")
    g.add_argument("--iters-per-step", type=int)
    g.add_argument("--trunc-iters", type=int)
    g.add_argument("--final-iters", type=int)
    g.add_argument("--max-layers", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--max-eval-samples", type=int)
    g.add_argument("--max-train-samples", type=int)
    g.add_argument("--max-drop", type=float)
    g.add_argument("--ranking", choices=["score", "score_per_mac", "auto"])
    g.add_argument(
        "--consumer-weighting",
        action="store_true",
        default=None,
        help="weight divergence group scores by the consumers' input norms "
        "(stock criteria ignore it)",
    )
    g.add_argument("--headline-target", type=float, default=0.25)
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="(seed, target) cells run at once in child processes (for a GPU; default 1)",
    )
    parser.add_argument(
        "--summarise",
        action="store_true",
        help="compress nothing: rebuild results, tables and plots from the reports saved under "
        "OUT/reports (e.g. by a run on a GPU machine); runs without a report are listed as "
        "not run",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take a run's saved report under OUT/reports when its config is identical "
        "(resume an interrupted grid, or merge cells run elsewhere)",
    )
    args = parser.parse_args(argv)

    overrides = {
        "targets": args.targets,
        "seeds": args.seeds,
        "steps": args.steps,
        "iters_per_step": args.iters_per_step,
        "trunc_iters": args.trunc_iters,
        "final_iters": args.final_iters,
        "max_layers": args.max_layers,
        "batch_size": args.batch_size,
        "max_eval_samples": args.max_eval_samples,
        "max_train_samples": args.max_train_samples,
        "max_drop": args.max_drop,
        "ranking": args.ranking,
        "consumer_weighting": args.consumer_weighting,
        "sfp_epochs": args.sfp_epochs,
    }
    proto = choose_protocol(args.mode, QUICK, FULL, **overrides)
    methods = parse_methods(args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    headline_target = (
        args.headline_target
        if any(abs(t - args.headline_target) < 1e-9 for t in proto.targets)
        else proto.targets[len(proto.targets) // 2]
    )
    model = Model(args.arch, args.dataset, args.in_chans, args.input_size, args.device)
    started = time.perf_counter()
    tcfg = train_config(
        args.arch, args.dataset, args.in_chans, args.input_size, args.base_epochs, args.device
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        base = saved_base_model(tcfg, out)
    else:
        base = ensure_base_model(tcfg, base_weights=args.base_weights)
    log(f"quality: base model {base.source}")
    runs = run_grid(
        proto,
        model,
        None if args.summarise else base.weights,
        methods,
        reports_dir=out / "reports",
        reuse=args.reuse,
        jobs=1 if args.summarise else args.jobs,
    )
    done = [r for r in runs if "error" not in r]
    summary = aggregate(runs)
    info = base.train_info or {}
    if not args.summarise:
        # Kept beside the results so that ``--summarise`` can describe the base model later,
        # on a machine without the cached weights.
        write_json(out / "base_train.json", info)
    ran_on = machine()
    if args.summarise and done:
        # The numbers come from the machine that wrote the reports, not from this one.
        first = load_saved_environment(out / "reports")
        ran_on = {**first, "summarised_on": ran_on.get("platform")}
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "mode": args.mode,
        "command": command_line(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": round(time.perf_counter() - started, 1),
        "summarised": bool(args.summarise),
        "model": asdict(model),
        "protocol": asdict(proto),
        "methods": {m: asdict(METHODS[m]) for m in methods},
        "base_model": {
            "source": base.source,
            "cache_key": base.key,
            "weights": str(base.weights.relative_to(REPO))
            if base.weights.is_relative_to(REPO)
            else str(base.weights),
            "train_test_top1": info.get("test_top1"),
            "train_config": info.get("config"),
            "eval_top1": done[0]["base_top1"] if done else None,
            "eval_samples": proto.max_eval_samples or "all",
        },
        "headline_target": headline_target,
        "headline": headline(summary, headline_target),
        "summary": summary,
        "budget": budget_checks(runs),
        "runs": runs,
        "machine": ran_on,
    }
    write_json(out / "results.json", payload)
    base_top1 = payload["base_model"]["eval_top1"]
    plot_accuracy_vs_macs(runs, base_top1, out / "accuracy_vs_macs.png")
    plot_headline(summary, headline_target, base_top1, out / "headline.png")
    write_text(out / "RESULTS.md", markdown(payload))
    log(f"quality: wrote {out / 'results.json'}, {out / 'RESULTS.md'} and plots")
    return 1 if len(done) < len(runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
