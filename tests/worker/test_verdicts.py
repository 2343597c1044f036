"""A job's status carries the run's MACs-target verdict (copied from its report)."""

from __future__ import annotations

from flow_compress.config import CompressionConfig
from flow_compress.schema import CompressionReport, ModelMetrics, StepRecord
from worker.tasks import summarise


def _report(target_met: bool | None) -> CompressionReport:
    metrics = ModelMetrics(top1=90.0, top5=99.0, macs=1000, params=100)
    return CompressionReport(
        model="resnet18",
        dataset="digits",
        config=CompressionConfig(model="resnet18", dataset="digits", target_macs=0.3),
        base=metrics,
        pruned=metrics.model_copy(update={"macs": 410, "top1": 89.0}),
        macs_ratio=0.41,
        target_met=target_met,
        params_ratio=1.0,
        top1_drop=1.0,
        steps=[StepRecord(step=0, stage="Baseline", macs=1000, params=100, top1=90, top5=99)],
    )


def test_the_job_result_carries_the_target_verdict() -> None:
    assert summarise(_report(False))["target_met"] is False
    assert summarise(_report(True))["target_met"] is True
    assert "target_met" not in summarise(_report(None)), "a v1 report has no verdict to copy"
