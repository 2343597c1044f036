"""bench.quality compares criteria at an identical budget: the stock baselines (L1, Taylor,
random) and IDAP++ stage 1 only are driven through the same schedule as IDAP++ (full) and
spend exactly as many optimisation steps, the stage-2 steps being added to their fine-tune.

Tiny and real: resnet18 at 16 px on scikit-learn's digits, two stage-1 steps of two
recovery steps each, every method through the library's ``compress``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.quality import METHODS, PIPELINE, REFERENCE, budget_checks, run_grid

from .conftest import MODEL, TINY

PROTO = TINY
# What may differ between methods' configs; everything else must be identical.
VARYING = (("prune", "criterion"), ("truncate", "enabled"), ("recovery", "final_iters"))

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def grid(
    tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[dict[str, Any]], Path]:
    reports = tmp_path_factory.mktemp("quality") / "reports"
    runs = run_grid(PROTO, MODEL, tiny_weights, list(PIPELINE), reports_dir=reports)
    return runs, reports


def test_every_method_ran(grid: tuple[list[dict[str, Any]], Path]) -> None:
    runs, _ = grid
    assert runs[0]["method"] == REFERENCE  # the reference runs first
    assert sorted(r["method"] for r in runs) == sorted(PIPELINE)
    assert all("error" not in r for r in runs), [r.get("error") for r in runs]


def test_same_number_of_recovery_steps(grid: tuple[list[dict[str, Any]], Path]) -> None:
    runs, _ = grid
    by = {r["method"]: r for r in runs}
    trunc = by[REFERENCE]["recovery_iterations"].get("Layer Trunc", 0)
    assert trunc >= PROTO.trunc_iters  # stage 2 tried at least one block
    stage1 = PROTO.steps * PROTO.iters_per_step
    assert by[REFERENCE]["recovery_iterations"] == {
        "Filter Prune": stage1,
        "Layer Trunc": trunc,
        "Final Fine-Tune": PROTO.final_iters,
    }
    for method, row in by.items():
        if method != REFERENCE:
            assert row["recovery_iterations"] == {
                "Filter Prune": stage1,
                "Final Fine-Tune": PROTO.final_iters + trunc,
            }, method
    assert len({r["total_steps"] for r in runs}) == 1
    check = budget_checks(runs)
    assert len(check) == 1 and check[0]["budget_equal"] and check[0]["schedule_equal"]


def test_same_schedule(grid: tuple[list[dict[str, Any]], Path]) -> None:
    runs, _ = grid
    for r in runs:
        assert r["filter_prune_attempts"] == PROTO.steps, r["method"]
        assert r["filter_prune_rollbacks"] == 0, r["method"]
        assert len(r["step_macs_ratios"]) == PROTO.steps, r["method"]
        # Every method meets the same per-step MACs targets (the cut stops within 1 % of the
        # step target, channel granularity aside).
        assert r["step_macs_ratios"][-1] == pytest.approx(PROTO.targets[0], abs=0.03)
    ratios = [r["step_macs_ratios"] for r in runs]
    for step in range(PROTO.steps):
        values = [rs[step] for rs in ratios]
        assert max(values) - min(values) < 0.03, (step, values)


def test_configs_differ_only_in_criterion_stage2_and_finetune(
    grid: tuple[list[dict[str, Any]], Path],
) -> None:
    _, reports = grid
    configs = {}
    for path in sorted(reports.glob("*.json")):
        if path.name.endswith(".plan.json"):
            assert (path.parent / path.name.replace(".plan.json", ".json")).is_file()
            continue
        cfg = json.loads(path.read_text())["config"]
        method = path.name.split("-t")[0]
        assert cfg["prune"]["criterion"] == METHODS[method].criterion
        assert cfg["truncate"]["enabled"] == METHODS[method].stage2
        for section, key in VARYING:
            cfg[section].pop(key)
        configs[method] = cfg
    assert sorted(configs) == sorted(PIPELINE)
    first = next(iter(configs.values()))
    assert all(c == first for c in configs.values())


def test_summarise_reuses_saved_reports_only_for_the_same_config(
    grid: tuple[list[dict[str, Any]], Path],
) -> None:
    runs, reports = grid
    # No weights: nothing may be compressed, every row must come from a saved report.
    again = run_grid(PROTO, MODEL, None, list(PIPELINE), reports_dir=reports)
    strip = ("wall_s",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in again] == [
        {k: v for k, v in r.items() if k not in strip} for r in runs
    ]
    # A different protocol matches no saved report: listed as not run, not silently reused.
    other = run_grid(
        replace(PROTO, final_iters=PROTO.final_iters + 1),
        MODEL,
        None,
        list(PIPELINE),
        reports_dir=reports,
    )
    assert all(r["error"].startswith("not run") for r in other)
