"""Verdicts that can fail: the MACs target and the output bound, each decided on the run's own
numbers, each able to fail the job when the configuration asks (docs/algorithm.md,
"Verdicts")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flow_compress.cli import app
from flow_compress.config import CompressionConfig, GuaranteeConfig
from flow_compress.data import DataSplits
from flow_compress.errors import BudgetExceededError, ErrorCode, GuaranteeExceededError
from flow_compress.pipeline import compress, run_pipeline
from flow_compress.pipeline.compress import Prepared, finalize
from flow_compress.pipeline.run import CompressionResult

from .conftest import SIZE, small_config


def _prepared(config: CompressionConfig, model: torch.nn.Module, data: DataSplits) -> Prepared:
    return Prepared(config, data, model, 10, SIZE, None, (), 0.0)


@pytest.fixture(scope="module")
def unpruned(trained_resnet: torch.nn.Module, digits: DataSplits) -> CompressionResult:
    """A run that prunes nothing: the MACs target is missed by construction."""
    cfg = small_config(
        target_macs=0.5,
        prune={"enabled": False},
        truncate={"enabled": False},
        recovery={"final_iters": 0},
    )
    return run_pipeline(trained_resnet, digits, cfg)


@pytest.fixture(scope="module")
def damaged(trained_resnet: torch.nn.Module, digits: DataSplits) -> CompressionResult:
    """Half the MACs cut in one step with no recovery: the outputs move."""
    cfg = small_config(
        target_macs=0.5,
        max_drop=100.0,
        prune={"steps": 1},
        truncate={"enabled": False},
        recovery={"iters_per_step": 0, "final_iters": 0},
    )
    return run_pipeline(trained_resnet, digits, cfg)


def test_a_missed_target_is_published_as_missed(
    unpruned: CompressionResult, trained_resnet: torch.nn.Module, digits: DataSplits
) -> None:
    config = unpruned.context.config
    measured = finalize(_prepared(config, trained_resnet, digits), unpruned)
    assert measured.target_met is False
    assert measured.pruned_cost[0] == unpruned.context.base_macs


def test_a_missed_target_fails_the_job_when_asked(
    unpruned: CompressionResult, trained_resnet: torch.nn.Module, digits: DataSplits
) -> None:
    config = unpruned.context.config.model_copy(update={"on_target_missed": "fail"})
    with pytest.raises(BudgetExceededError, match=r"best model reached keeps 100\.0%") as err:
        finalize(_prepared(config, trained_resnet, digits), unpruned)
    assert err.value.code == ErrorCode.BUDGET_EXCEEDED == "budget_exceeded"


def test_a_reached_target_is_met(
    damaged: CompressionResult, trained_resnet: torch.nn.Module, digits: DataSplits
) -> None:
    measured = finalize(_prepared(damaged.context.config, trained_resnet, digits), damaged)
    assert measured.target_met is True
    assert measured.pruned_cost[0] <= 0.5 * damaged.context.base_macs * 1.01


def test_the_output_bound_holds_or_is_exceeded_against_the_tolerance(
    damaged: CompressionResult, trained_resnet: torch.nn.Module, digits: DataSplits
) -> None:
    config = damaged.context.config
    tight = config.model_copy(update={"guarantee": GuaranteeConfig(delta_max=1e-9)})
    exceeded = finalize(_prepared(tight, trained_resnet, digits), damaged).guarantee
    assert exceeded is not None
    assert exceeded.holds is False and exceeded.delta_p99 > 1e-9
    # The same run against a tolerance at its own p99 holds (the bound is "<="), and just
    # below it is exceeded: the verdict turns on the measured value, not on the run.
    p99 = exceeded.delta_p99
    assert p99 <= GuaranteeConfig.model_fields["delta_max"].metadata[-1].le, "damaged too far"
    at = config.model_copy(update={"guarantee": GuaranteeConfig(delta_max=p99)})
    below = config.model_copy(update={"guarantee": GuaranteeConfig(delta_max=p99 * 0.999)})
    held = finalize(_prepared(at, trained_resnet, digits), damaged).guarantee
    missed = finalize(_prepared(below, trained_resnet, digits), damaged).guarantee
    assert held is not None and missed is not None
    assert held.holds is True and held.delta_max == p99 and held.delta_p99 == p99
    assert missed.holds is False


def test_an_exceeded_bound_fails_the_job_when_enforced(
    trained_weights: Path, tmp_path: Path
) -> None:
    cfg = small_config(
        prune={"steps": 1},
        truncate={"enabled": False},
        recovery={"iters_per_step": 0, "final_iters": 0},
        latency={"enabled": False},
        guarantee={"delta_max": 1e-9, "enforce": True},
        max_drop=100.0,
    )
    out = tmp_path / "out"
    with pytest.raises(GuaranteeExceededError, match=r"above guarantee\.delta_max") as err:
        compress(cfg, weights=trained_weights, out_dir=out)
    assert err.value.code == "guarantee_exceeded"
    assert list(tmp_path.iterdir()) == [], "nothing published, no scratch folder left"


def test_cli_fails_a_missed_target_with_budget_exceeded(
    trained_weights: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"prune": {"enabled": false}, "latency": {"enabled": false}}')
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "--model",
            "resnet18",
            "--weights",
            str(trained_weights),
            "--dataset",
            "digits",
            "--in-chans",
            "1",
            "--input-size",
            str(SIZE),
            "--no-stage2",
            "--final-iters",
            "0",
            "--target-macs",
            "0.3",
            "--on-target-missed",
            "fail",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "error [budget_exceeded]" in result.output and "keeps 100.0%" in result.output
    assert not (tmp_path / "out").exists()
