"""The zoo's CI sample: a fixed, diverse set of small timm and torchvision classifiers, none of
which has hand-written family rules except where noted in ``bench.zoo.sweep.SAMPLE``, each
through every step of ``bench.zoo.steps.run_model`` (the library's own stage-1 cut, stage-2
attempt, TorchScript + ONNX export with parity, plan replay) on real data (digits)."""

from __future__ import annotations

import pytest

from bench.zoo.steps import STEPS, run_model
from bench.zoo.sweep import SAMPLE, summarise

pytest.importorskip("timm")


@pytest.mark.parametrize("ref", SAMPLE)
def test_sample_model_passes_every_step(ref: str) -> None:
    source, _, name = ref.partition(":")
    row = run_model(source, name, check_unpruned=False)
    assert row["status"] == "pass", f"{ref}: {row.get('failed_step')}: {row.get('reason')}"
    done = [s for s in STEPS if s != "export_unpruned"]
    assert all(row["steps"][s]["ok"] for s in done)
    # the invariants the steps check, restated on the row they report
    assert 0 < row["stage1_macs_ratio"] < 1
    assert row["replay_max_abs_diff"] <= 1e-4
    assert set(row["parity"]) == {"torchscript", "onnx"}


def test_summary_counts_coverage_over_models_that_build_and_export() -> None:
    rows = [
        {"source": "timm", "model": "a", "status": "pass"},
        {"source": "timm", "model": "b", "status": "fail", "failed_step": "stage1", "reason": "x"},
        {
            "source": "torchvision",
            "model": "c",
            "status": "skip",
            "failed_step": "build",
            "reason": "y",
        },
    ]
    s = summarise(rows)
    assert (s["eligible"], s["passed"], s["skipped"]) == (2, 1, 1)
    assert s["coverage"] == 0.5
