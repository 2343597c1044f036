"""The report on disk: JSON that round-trips, Markdown a person can read, real PNG plots."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from flow_compress.config import CompressionConfig
from flow_compress.contract import build_contract
from flow_compress.data import FASHION_MNIST_CLASSES
from flow_compress.report import PLOT_NAMES, plot_dynamics, render_markdown, write_report
from flow_compress.report.plots import _draw_panel
from flow_compress.schema import (
    CompressionReport,
    CostModelStats,
    DeploymentOutcome,
    Guarantee,
    LatencyRecord,
    ModelMetrics,
    ParityRecord,
    StepRecord,
    speedup_verdict,
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
    assert text.startswith('{\n  "schema_version": 4,')
    assert CompressionReport.model_validate_json(text) == report
    assert (out / "report.md").read_text(encoding="utf-8") == render_markdown(report)


def test_markdown_headline_finds_the_row_of_a_runtime_at_a_batch() -> None:
    # compress writes the headline's runtime as '<runtime>@b<batch>'.
    md = render_markdown(make_report(speedup=40.2 / 13.1, speedup_runtime="onnxruntime@b32"))
    assert "**3.07×** with ONNX Runtime at batch 32 on " + CPU in md


# --------------------------------------------------------------------------- deployment

DEPLOYMENT_CPU = "AMD EPYC 7763 64-Core Processor (2 threads)"
BASE_MS = 4.2


def _timed_steps() -> list[StepRecord]:
    """The trajectory timed on the deployment after every step; stage-1 steps also carry the
    cost model's prediction, a little off the measurement."""
    steps = _steps()
    base_macs = steps[0].macs
    timed = []
    for s in steps:
        ms = round(0.6 + (BASE_MS - 0.6) * s.macs / base_macs, 4)
        predicted = round(ms * 1.08, 4) if s.stage == "Filter Prune" else None
        timed.append(s.model_copy(update={"latency_ms": ms, "predicted_latency_ms": predicted}))
    return timed


def _outcome(pruned_ms: float, spread: float = 0.04, **targets: float) -> DeploymentOutcome:
    speedup = BASE_MS / pruned_ms
    met = None
    if targets:
        met = pruned_ms <= targets.get("target_latency_ms", math.inf) and speedup >= targets.get(
            "target_speedup", 0.0
        )
    return DeploymentOutcome(
        deployment="onnxruntime/cpu/b1/fp32/2t",
        runtime="onnxruntime",
        device=DEPLOYMENT_CPU,
        batch_size=1,
        dtype="fp32",
        threads=2,
        base_ms=BASE_MS,
        pruned_ms=pruned_ms,
        speedup=speedup,
        spread=spread,
        verdict=speedup_verdict(speedup, spread),
        latency_target_met=met,
        cost_model=CostModelStats(
            table_entries=214,
            measured=38,
            reused=1190,
            build_s=41.3,
            cache_file="/var/cache/flow-compress/latency/onnxruntime-cpu-b1-fp32-2t.json",
            steps_checked=8,
            mean_abs_error_pct=7.9,
            max_abs_error_pct=12.4,
        ),
        **targets,
    )


def make_deployed_report(
    pruned_ms: float, *, target_macs: float | None = None, spread: float = 0.04
) -> CompressionReport:
    """A job with a latency target (2.5 ms and 2×) on ONNX Runtime, CPU, batch 1, 2 threads."""
    targets = {"target_latency_ms": 2.5, "target_speedup": 2.0}
    config = CompressionConfig(
        model="resnet18",
        dataset="fashion-mnist",
        in_chans=1,
        input_size=28,
        target_macs=target_macs,
        deployment={"threads": 2},
        **targets,
    )
    outcome = _outcome(pruned_ms, spread, **targets)
    base = make_report()
    macs_met = target_macs is None or base.macs_ratio <= target_macs * 1.01
    return make_report(
        config=config,
        steps=_timed_steps(),
        deployment=outcome,
        speedup=outcome.speedup,
        speedup_runtime=outcome.deployment,
        target_met=macs_met and bool(outcome.latency_target_met),
    )


def _summary(md: str) -> str:
    return md.split("\n\n", 2)[1]


def test_markdown_states_the_speedup_on_the_deployment_and_its_target() -> None:
    report = make_deployed_report(1.9)
    assert report.deployment is not None and report.deployment.verdict == "faster"
    md = render_markdown(report)
    summary = _summary(md)
    assert summary.startswith(
        "On its deployment `onnxruntime/cpu/b1/fp32/2t` (ONNX Runtime on "
        f"{DEPLOYMENT_CPU}) the pruned model runs at **2.21×** the base's speed, "
        "4.20 → 1.90 ms per batch of 1: it is **faster**."
    )
    assert "Latency target (≤ 2.50 ms per batch and ≥ 2.00× speed-up): **met**." in summary
    assert "(no MACs target)" in summary
    assert (
        "| Latency (ms), onnxruntime/cpu/b1/fp32/2t | 4.20 | 1.90 | 2.21× speed-up (faster) |" in md
    )

    section = md.split("## Deployment\n", 1)[1].split("\n## ", 1)[0]
    assert f"| Hardware | {DEPLOYMENT_CPU} |" in section
    assert "| Speed-up | **2.21×** |" in section
    assert "| Verdict | **faster** |" in section
    assert "| Latency target | ≤ 2.50 ms per batch |" in section
    assert "| Speed-up target | ≥ 2.00× |" in section
    assert "| Latency target reached | **met** |" in section
    assert "### Cost model" in section
    assert "| Layer timings measured in this run | 38 |" in section
    assert "| Lookups answered by the table | 1,190 |" in section
    assert "| Mean prediction error | 7.9 % |" in section
    assert "| Largest prediction error | 12.4 % |" in section
    assert "The prediction error is |predicted − measured| ÷ measured" in section

    header = "| Step | Stage | GMACs | Params (M) | Top-1 | Top-5 | Latency (ms) | Predicted (ms) |"
    assert header in md
    assert "| 0 | Baseline | 0.556 | 11.17 | 93.40 % | 99.80 % | 4.20 | - |" in md
    assert "| 1 | Filter Prune | 0.467 | 8.94 | 93.25 % | 99.60 % | 3.62 | 3.91 |" in md
    assert "| 11 | Final Fine-Tune | 0.112 | 1.35 | 91.86 % | 99.70 % | 1.32 | - |" in md
    assert "| MACs target | none (latency target only) |" in md
    assert "| Deployment | `onnxruntime/cpu/b1/fp32/2t` (5 warm-up, 25 timed runs" in md


def test_an_old_report_keeps_its_dynamics_table(report: CompressionReport) -> None:
    md = render_markdown(report)
    assert "Latency (ms)" not in md and "Predicted (ms)" not in md
    assert "## Deployment" not in md


# A "faster" anywhere in the document that is not the verdict "no faster".
CALLED_FASTER = re.compile(r"(?<!no )\bfaster\b")


@pytest.mark.parametrize(
    ("pruned_ms", "verdict"),
    [pytest.param(4.15, "no faster", id="no_faster"), pytest.param(4.6, "slower", id="slower")],
)
def test_a_model_that_is_not_faster_is_never_called_faster(pruned_ms: float, verdict: str) -> None:
    report = make_deployed_report(pruned_ms, spread=0.05)
    assert report.deployment is not None and report.deployment.verdict == verdict
    assert report.target_met is False
    md = render_markdown(report)
    assert f"it is **{verdict}**" in _summary(md)
    assert "**faster**" not in md
    assert CALLED_FASTER.findall(md) == []
    assert "): **missed** within the accuracy budget." in _summary(md)
    assert "| Latency target reached | **missed** |" in md


def test_the_faster_check_can_fail() -> None:
    # The check above must be able to see a "faster": it does in a faster model's report.
    assert CALLED_FASTER.findall(render_markdown(make_deployed_report(1.9)))


def test_a_missed_latency_target_leaves_the_macs_verdict_alone() -> None:
    report = make_deployed_report(3.0, target_macs=0.25)
    assert report.target_met is False
    summary = _summary(render_markdown(report))
    assert "target 25.0 %: **met**" in summary
    assert "Latency target (≤ 2.50 ms per batch and ≥ 2.00× speed-up): **missed**" in summary


def test_a_report_without_a_macs_target_renders(tmp_path: Path) -> None:
    report = make_report(
        config=CompressionConfig(
            model="resnet18", dataset="fashion-mnist", in_chans=1, input_size=28, target_speedup=2
        ),
        target_met=False,
    )
    assert report.config.target_macs is None
    md = render_markdown(report)
    assert "(no MACs target)" in md and "| MACs target | none (latency target only) |" in md
    names = plot_dynamics(report, tmp_path)
    assert names == ["macs.png", "params.png", "top1.png", "dynamics.png"], "no steps were timed"
    fig = Figure()
    ax = fig.add_subplot()
    _draw_panel(ax, report, "macs", legend=True)
    labels = ax.get_legend_handles_labels()[1]
    assert "base" in labels and not any("MACs target" in label for label in labels)


def test_a_macs_target_is_drawn() -> None:
    fig = Figure()
    ax = fig.add_subplot()
    _draw_panel(ax, make_report(), "macs", legend=True)
    assert "MACs target (25 % of base)" in ax.get_legend_handles_labels()[1]


def test_write_report_plots_speedup_against_macs(tmp_path: Path) -> None:
    names = write_report(make_deployed_report(1.9), tmp_path)
    assert names[-1] == "speedup.png" and names.count("speedup.png") == 1
    assert "speedup.png" in PLOT_NAMES
    width, height = _png_size(tmp_path / "speedup.png")
    assert width > height > 300
    assert (tmp_path / "speedup.png").stat().st_size > 15_000


def test_one_timed_step_draws_no_speedup_plot(tmp_path: Path) -> None:
    steps = _steps()
    steps[0] = steps[0].model_copy(update={"latency_ms": BASE_MS})
    assert "speedup.png" not in plot_dynamics(make_report(steps=steps), tmp_path)
