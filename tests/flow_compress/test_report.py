"""The report on disk: JSON that round-trips, Markdown a person can read, real PNG plots."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from flow_compress.config import CompressionConfig
from flow_compress.contract import build_contract
from flow_compress.data import FASHION_MNIST_CLASSES
from flow_compress.report import plot_dynamics, render_markdown, write_report
from flow_compress.schema import (
    CompressionReport,
    Guarantee,
    LatencyRecord,
    ModelMetrics,
    ParityRecord,
    StepRecord,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CPU = "cpu (AMD EPYC 7763 64-Core Processor, 8 threads)"


def _steps() -> list[StepRecord]:
    """A ResNet-18 / Fashion-MNIST-like trajectory: 8 prune steps (one rolled back), two
    truncations, a final fine-tune."""
    macs, params, top1 = 556_000_000, 11_170_000, 93.40
    steps = [StepRecord(step=0, stage="Baseline", macs=macs, params=params, top1=top1, top5=99.8)]
    for k in range(1, 9):
        macs, params, top1 = int(macs * 0.84), int(params * 0.8), top1 - 0.12 - 0.03 * k
        steps.append(
            StepRecord(step=k, stage="Filter Prune", macs=macs, params=params, top1=top1, top5=99.6)
        )
        if k == 6:
            steps.append(
                StepRecord(
                    step=k,
                    stage="Filter Prune",
                    macs=int(macs * 0.8),
                    params=int(params * 0.8),
                    top1=top1 - 2.4,
                    top5=99.0,
                    accepted=False,
                    detail="top-1 fell 2.4 points; retried at half the ratio",
                )
            )
    for k in (9, 10):
        macs, params, top1 = int(macs * 0.9), int(params * 0.85), top1 - 0.3
        steps.append(
            StepRecord(
                step=k,
                stage="Layer Trunc",
                macs=macs,
                params=params,
                top1=top1,
                top5=99.5,
                detail=f"layer{k - 7}.1 -> identity",
            )
        )
    steps.append(
        StepRecord(
            step=11, stage="Final Fine-Tune", macs=macs, params=params, top1=top1 + 1.1, top5=99.7
        )
    )
    return steps


def _latency(device: str = CPU) -> list[LatencyRecord]:
    timings = [
        ("eager", 1, 4.1, 1.9),
        ("eager", 32, 61.0, 22.0),
        ("torchscript", 1, 3.6, 1.6),
        ("torchscript", 32, 58.0, 20.5),
        ("onnxruntime", 1, 1.9, 0.71),
        ("onnxruntime", 32, 40.2, 13.1),
    ]
    return [
        LatencyRecord(
            runtime=rt,
            batch_size=b,
            device=device,
            dtype="float32",
            base_ms=bm,
            pruned_ms=pm,
            speedup=bm / pm,
        )
        for rt, b, bm, pm in timings
    ]


def make_report(**overrides: object) -> CompressionReport:
    steps = _steps()
    base, final = steps[0], steps[-1]
    fields: dict[str, object] = {
        "model": "resnet18",
        "dataset": "fashion-mnist",
        "config": CompressionConfig(
            model="resnet18", dataset="fashion-mnist", target_macs=0.25, in_chans=1, input_size=28
        ),
        "base": ModelMetrics(top1=93.56, top5=99.85, macs=base.macs, params=base.params),
        "pruned": ModelMetrics(top1=92.71, top5=99.80, macs=final.macs, params=final.params),
        "macs_ratio": final.macs / base.macs,
        "target_met": True,
        "params_ratio": final.params / base.params,
        "top1_drop": 0.85,
        "speedup": 1.9 / 0.71,
        "speedup_runtime": "onnxruntime",
        "latency": _latency(),
        "steps": steps,
        "recovery_iterations": {"Filter Prune": 1200, "Layer Trunc": 200, "Final Fine-Tune": 600},
        "guarantee": Guarantee(delta_p99=0.0213, delta_max=0.05, holds=True),
        "parity": [
            ParityRecord(format="torchscript", max_abs_diff=0.0, samples=64, passed=True),
            ParityRecord(format="onnx", max_abs_diff=2.1e-6, samples=64, passed=True),
        ],
        "timings_s": {
            "scoring": 20.0,
            "surgery": 10.0,
            "recovery": 600.0,
            "evaluation": 60.0,
            "stage1_total": 412.9,
            "stage2_total": 96.0,
            "finetune_total": 201.4,
            "total": 710.0,
        },
        "environment": {"device": CPU, "torch": "2.14.1", "onnxruntime": "1.32.0"},
        "splits": {"train": 54000, "val": 6000, "test": 10000},
        "weights_sha256": "ab" * 32,
        "pruned_weights_sha256": "cd" * 32,
        "input_contract": build_contract(28, 1, class_names=FASHION_MNIST_CLASSES),
        "notes": ["Truncation stopped after 2 removals: the third cost 0.8 points (tau 0.5)."],
    }
    fields.update(overrides)
    return CompressionReport.model_validate(fields)


@pytest.fixture(scope="module")
def report() -> CompressionReport:
    return make_report()


def test_markdown_headline_states_the_result(report: CompressionReport) -> None:
    md = render_markdown(report)
    assert md.startswith("# Compression report: resnet18 on fashion-mnist\n")
    assert "| Top-1 (test) | 93.56 % | 92.71 % | -0.85 pts |" in md
    assert "| Top-5 (test) | 99.85 % | 99.80 % |" in md
    assert "| GMACs | 0.556 | 0.112 |" in md
    assert "FLOPs = 2 × MACs" in md
    assert "| Params (M) | 11.17 | 1.35 |" in md
    assert "**2.68×** with ONNX Runtime at batch 1 on " + CPU in md


def test_markdown_latency_table(report: CompressionReport) -> None:
    md = render_markdown(report)
    assert "| Runtime | Batch | Base (ms) | Pruned (ms) | Speed-up |" in md
    assert "| ONNX Runtime | 32 | 40.20 | 13.10 | 3.07× |" in md
    assert "| PyTorch eager | 1 | 4.10 | 1.90 | 2.16× |" in md
    assert f"Device: {CPU}; dtype: float32." in md


def test_markdown_latency_names_devices_per_row_when_they_differ() -> None:
    gpu = "cuda:0 (NVIDIA H100 80GB HBM3)"
    records = _latency(gpu)
    records[-1] = records[-1].model_copy(update={"device": CPU})
    md = render_markdown(make_report(latency=records))
    assert "| Runtime | Batch | Device | Base (ms) | Pruned (ms) | Speed-up |" in md
    assert f"| PyTorch eager | 1 | {gpu} |" in md
    assert f"| ONNX Runtime | 32 | {CPU} |" in md


def test_markdown_dynamics_table_has_every_step(report: CompressionReport) -> None:
    md = render_markdown(report)
    assert "| Step | Stage | GMACs | Params (M) | Top-1 | Top-5 |" in md
    assert "| 0 | Baseline | 0.556 | 11.17 | 93.40 % | 99.80 % |" in md
    assert "| 6 (rolled back) | Filter Prune |" in md
    assert "| 11 | Final Fine-Tune | 0.112 | 1.35 |" in md
    rows = [line for line in md.splitlines() if re.match(r"\| \d+( \(rolled back\))? \| ", line)]
    assert len(rows) == len(report.steps) == 13
    assert "- step 9 (Layer Trunc): layer2.1 -> identity" in md


def test_markdown_guarantee_parity_timings_environment_notes(report: CompressionReport) -> None:
    md = render_markdown(report)
    assert "99th percentile" in md and "**0.0213**" in md and "Δmax = 0.05" in md
    assert "the bound **holds** for at least 99 %" in md
    assert "| ONNX | 64 | 2.1e-06 | 0.001 | pass |" in md
    assert "| TorchScript | 64 | 0 | 0.001 | pass |" in md
    assert "| recovery | 10 min 00 s | 85 % |" in md
    assert "| **Total (wall)** | **11 min 50 s** | 100 % |" in md
    assert "| Filter Prune (stage 1) | 6 min 53 s |" in md
    assert "| torch | 2.14.1 |" in md
    assert "- Truncation stopped after 2 removals" in md
    assert '"schema_version"' not in md and "{'" not in md, "no raw dumps"


def test_markdown_says_what_was_not_measured() -> None:
    md = render_markdown(
        make_report(
            latency=[], speedup=None, speedup_runtime=None, guarantee=None, parity=[], notes=[]
        )
    )
    assert "No latency was measured." in md
    assert "Latency was not measured for this job." in md
    assert "The output bound was not checked for this job." in md
    assert "No exported model was checked." in md
    assert "## Notes" not in md


def test_markdown_flags_a_broken_bound() -> None:
    md = render_markdown(
        make_report(guarantee=Guarantee(delta_p99=0.31, delta_max=0.05, holds=False))
    )
    assert "**exceeded**" in md and "**holds**" not in md
    assert "guarantee.enforce" in md


def test_a_verdict_cannot_contradict_its_numbers() -> None:
    with pytest.raises(ValueError, match="contradicts"):
        Guarantee(delta_p99=0.31, delta_max=0.05, holds=True)


def test_markdown_states_whether_the_target_was_met() -> None:
    assert "target 25.0 %: **met**" in render_markdown(make_report())
    missed = render_markdown(make_report(target_met=False))
    assert "target 25.0 %: **missed** within the accuracy budget" in missed


def test_markdown_labels_input_and_pruned_weights() -> None:
    md = render_markdown(make_report())
    assert f"| Input weights sha256 | `{'ab' * 32}` |" in md
    assert f"| Pruned weights sha256 (weights.safetensors) | `{'cd' * 32}` |" in md
    md = render_markdown(make_report(weights_sha256=None))
    assert "| Input weights sha256 | none (random init) |" in md


def test_markdown_states_the_input_contract() -> None:
    report = make_report()
    contract = report.input_contract
    assert contract is not None
    md = render_markdown(report)
    section = md.split("## Input contract", 1)[1].split("\n## ", 1)[0]
    assert f"| Input | `input`: float32 NCHW, 1 × {contract.height} × {contract.width} |" in section
    assert f"| Mean | {contract.mean[0]:g} |" in section
    assert f"| Std | {contract.std[0]:g} |" in section
    assert "Ankle boot" in section and "flow_compress.input_contract" in section
    # A report without a contract (schema version 2) renders without the section.
    assert "## Input contract" not in render_markdown(make_report(input_contract=None))


def test_a_report_of_schema_version_2_loads_without_a_contract() -> None:
    old = make_report().model_dump(mode="json")
    old["schema_version"] = 2
    del old["input_contract"]
    assert CompressionReport.model_validate(old).input_contract is None


def test_a_report_of_schema_version_1_still_loads() -> None:
    # bench --summarise rebuilds tables from saved reports of earlier runs.
    old = make_report().model_dump(mode="json")
    old["schema_version"] = 1
    for key in ("target_met", "pruned_weights_sha256"):
        del old[key]
    del old["guarantee"]["holds"]
    loaded = CompressionReport.model_validate(old)
    assert loaded.target_met is None and loaded.guarantee is not None
    assert "not judged" in render_markdown(loaded)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def written(report: CompressionReport, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("report") / "out"
    return out, write_report(report, out)


def test_plots_are_real_pngs(report: CompressionReport, written) -> None:
    out, names = written
    plots = [n for n in names if n.endswith(".png")]
    assert plots == ["macs.png", "params.png", "top1.png", "dynamics.png"]
    for name in plots:
        path = out / name
        assert path.stat().st_size > 15_000, name
        width, height = _png_size(path)
        assert width > height > 300, name
    combined, single = _png_size(out / "dynamics.png"), _png_size(out / "macs.png")
    assert combined[0] > 2 * single[0], "three panels side by side"


def test_no_steps_no_plots(tmp_path: Path) -> None:
    assert plot_dynamics(make_report(steps=[]), tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_write_report_writes_everything(report: CompressionReport, written) -> None:
    out, names = written
    assert names == [
        "report.json",
        "report.md",
        "macs.png",
        "params.png",
        "top1.png",
        "dynamics.png",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    text = (out / "report.json").read_text(encoding="utf-8")
    assert text.startswith('{\n  "schema_version": 3,')
    assert CompressionReport.model_validate_json(text) == report
    assert (out / "report.md").read_text(encoding="utf-8") == render_markdown(report)
