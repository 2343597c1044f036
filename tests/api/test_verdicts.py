"""``flow-compress submit --wait`` prints the MACs-target verdict and exits 3 on a miss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer

from api.cli import EXIT_THRESHOLD, _finish


class _Client:
    """The two calls ``_finish`` makes, answering with a fixed report."""

    def __init__(self, report: dict[str, Any]) -> None:
        self._report = report

    def report(self, job_id: str) -> dict[str, Any]:
        return self._report

    def download(self, job_id: str, dest: Path) -> list[Path]:
        return []


def _report(target_met: bool) -> dict[str, Any]:
    return {
        "base": {"top1": 90.0},
        "pruned": {"top1": 89.5},
        "top1_drop": 0.5,
        "macs_ratio": 0.412 if not target_met else 0.3,
        "target_met": target_met,
        "config": {"target_macs": 0.3},
    }


JOB = {"id": "ab" * 16, "state": "succeeded"}


def test_a_missed_target_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as exit_:
        _finish(_Client(_report(False)), JOB, None, None, None)  # type: ignore[arg-type]
    assert exit_.value.exit_code == EXIT_THRESHOLD == 3
    out = capsys.readouterr()
    assert "MACs target x0.300: MISSED" in out.out
    assert "MACs target x0.300 missed (reached x0.412)" in out.err


def test_a_met_target_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    _finish(_Client(_report(True)), JOB, None, None, None)  # type: ignore[arg-type]
    assert "MACs target x0.300: met" in capsys.readouterr().out


def _latency_report(speedup: float, met: bool | None) -> dict[str, Any]:
    report = _report(True)
    report["config"] = {"target_macs": None, "target_speedup": 2.0}
    report["target_met"] = met is not False
    report["deployment"] = {
        "deployment": "onnxruntime/cpu/b1/fp32",
        "base_ms": 10.0,
        "pruned_ms": 10.0 / speedup,
        "speedup": speedup,
        "verdict": "faster" if speedup > 1.02 else "no faster",
        "latency_target_met": met,
    }
    return report


def test_a_missed_latency_target_and_a_low_speedup_exit_3(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(typer.Exit) as exit_:
        _finish(_Client(_latency_report(1.5, False)), JOB, None, None, None, 1.8)  # type: ignore[arg-type]
    assert exit_.value.exit_code == EXIT_THRESHOLD
    out = capsys.readouterr()
    assert "speed-up 1.50x (faster); latency target MISSED" in out.out
    assert "latency target missed (speed-up 1.50x)" in out.err
    assert "speed-up 1.50x < 1.8" in out.err
    assert "MACs target" not in out.out  # a latency-only job has none


def test_a_met_latency_target_above_the_threshold_exits_0(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _finish(_Client(_latency_report(2.4, True)), JOB, None, None, None, 2.0)  # type: ignore[arg-type]
    assert "latency target met" in capsys.readouterr().out
    with pytest.raises(typer.Exit):
        _finish(_Client(_latency_report(2.4, True)), JOB, None, None, None, 2.5)  # type: ignore[arg-type]
