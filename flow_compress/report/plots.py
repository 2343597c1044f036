"""The compression-dynamics plots of a report: MACs, parameters and validation top-1 per step,
and, where the steps were timed on a deployment, speed-up against the MACs kept.

matplotlib's object-oriented API on Agg canvases (``matplotlib.figure.Figure``), never
``pyplot``: no global backend switch, no GUI, safe in worker processes and threads.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

from flow_compress.artifacts import atomic_write_bytes
from flow_compress.schema import CompressionReport, Stage, StepRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOT_NAMES = ("macs.png", "params.png", "top1.png", "dynamics.png", "speedup.png")

# Colour-blind-safe (Okabe-Ito) colours and distinct markers, so stages also separate in grey.
STAGE_STYLE: dict[Stage, tuple[str, str]] = {
    Stage.BASELINE: ("#000000", "s"),
    Stage.FILTER_PRUNE: ("#0072B2", "o"),
    Stage.LAYER_TRUNC: ("#D55E00", "^"),
    Stage.FINAL_FINE_TUNE: ("#009E73", "D"),
}


def _baseline_step(report: CompressionReport) -> StepRecord | None:
    for s in report.steps:
        if s.stage is Stage.BASELINE:
            return s
    return None


def _metric(s: StepRecord, key: str) -> float:
    if key == "macs":
        return s.macs / 1e9
    if key == "params":
        return s.params / 1e6
    return float(s.top1)


_PANELS: dict[str, tuple[str, str]] = {
    # key: (title, y label)
    "macs": ("Compute", "GMACs per image (FLOPs = 2 × MACs)"),
    "params": ("Parameters", "Parameters (millions)"),
    "top1": ("Accuracy", "Top-1 on validation (%)"),
}


def _draw_panel(ax: Axes, report: CompressionReport, key: str, *, legend: bool) -> None:
    """One metric over the steps: accepted steps joined by a line, stages by colour and marker,
    rolled-back attempts as hollow grey markers, base value (and target/budget) as references."""
    from matplotlib.ticker import MaxNLocator

    steps = report.steps
    accepted = [s for s in steps if s.accepted]
    baseline = _baseline_step(report)
    if key == "macs":
        base_value = (baseline.macs if baseline else report.base.macs) / 1e9
    elif key == "params":
        base_value = (baseline.params if baseline else report.base.params) / 1e6
    else:
        base_value = baseline.top1 if baseline else report.base.top1

    ax.axhline(base_value, color="#7f7f7f", linestyle="--", linewidth=1.0, label="base", zorder=1)
    target_macs = report.config.target_macs
    if key == "macs" and target_macs is not None:
        ax.axhline(
            base_value * target_macs,
            color="#CC79A7",
            linestyle=":",
            linewidth=1.4,
            label=f"MACs target ({target_macs * 100:.0f} % of base)",
            zorder=1,
        )
    if key == "top1":
        ax.axhline(
            base_value - report.config.max_drop,
            color="#CC79A7",
            linestyle="-.",
            linewidth=1.2,
            label=f"accuracy budget (base − {report.config.max_drop:g} pts)",
            zorder=1,
        )
    if accepted:
        ax.plot(
            [s.step for s in accepted],
            [_metric(s, key) for s in accepted],
            color="#bbbbbb",
            linewidth=1.5,
            zorder=2,
        )
    present = [st for st in STAGE_STYLE if any(s.stage == st for s in accepted)]
    for stage in present:
        color, marker = STAGE_STYLE[stage]
        points = [s for s in accepted if s.stage == stage]
        ax.scatter(
            [s.step for s in points],
            [_metric(s, key) for s in points],
            color=color,
            marker=marker,
            s=42,
            label=stage,
            zorder=3,
            edgecolors="white",
            linewidths=0.6,
        )
    rejected = [s for s in steps if not s.accepted]
    if rejected:
        ax.scatter(
            [s.step for s in rejected],
            [_metric(s, key) for s in rejected],
            facecolors="none",
            edgecolors="#7f7f7f",
            marker="o",
            s=42,
            label="rolled back",
            zorder=3,
        )
    if accepted:
        last = accepted[-1]
        value = _metric(last, key)
        text = f"{value:.2f}" if key == "top1" else f"{value:.3g}"
        # Cost falls towards the target line, so its label goes under the point; accuracy's
        # budget line lies below, so its label goes above.
        below = key in ("macs", "params")
        ax.annotate(
            text,
            (last.step, value),
            textcoords="offset points",
            xytext=(0, -10 if below else 8),
            ha="center",
            va="top" if below else "bottom",
            fontsize=8,
        )
    title, ylabel = _PANELS[key]
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("Step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3, linewidth=0.6)
    if key in ("macs", "params"):
        ax.set_ylim(bottom=0)
    if legend:
        ax.legend(fontsize=8, frameon=False, loc="best")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _reference_step(report: CompressionReport) -> StepRecord | None:
    """The step speed-ups are measured against: the baseline, timed on the deployment."""
    reference = _baseline_step(report) or (report.steps[0] if report.steps else None)
    return reference if reference is not None and reference.latency_ms else None


def _draw_speedup(fig: Figure, report: CompressionReport) -> bool:
    """Speed-up on the deployment against the MACs kept, one point per timed step (stages by
    colour and marker, rolled-back steps hollow, the cost model's predictions as crosses);
    False when fewer than two steps were timed."""
    reference = _reference_step(report)
    timed = [s for s in report.steps if s.latency_ms]
    if reference is None or len(timed) < 2:
        return False
    base_ms, base_macs = float(reference.latency_ms or 0), reference.macs

    def x(s: StepRecord) -> float:
        return s.macs / base_macs * 100

    def y(ms: float | None) -> float:
        return base_ms / ms if ms else math.nan

    ax = fig.add_subplot()
    ax.axhline(1.0, color="#7f7f7f", linestyle="--", linewidth=1.0, label="base (1×)", zorder=1)
    d = report.deployment
    target_speedup = report.config.target_speedup
    if target_speedup is not None:
        ax.axhline(
            target_speedup,
            color="#CC79A7",
            linestyle=":",
            linewidth=1.4,
            label=f"speed-up target ({target_speedup:g}×)",
            zorder=1,
        )
    target_ms = report.config.target_latency_ms
    if target_ms is not None:
        ax.axhline(
            base_ms / target_ms,
            color="#CC79A7",
            linestyle="-.",
            linewidth=1.2,
            label=f"latency target ({target_ms:g} ms)",
            zorder=1,
        )
    accepted = [s for s in timed if s.accepted]
    if accepted:
        ax.plot(
            [x(s) for s in accepted],
            [y(s.latency_ms) for s in accepted],
            color="#bbbbbb",
            linewidth=1.5,
            zorder=2,
        )
    for stage, (color, marker) in STAGE_STYLE.items():
        points = [s for s in accepted if s.stage == stage]
        if points:
            ax.scatter(
                [x(s) for s in points],
                [y(s.latency_ms) for s in points],
                color=color,
                marker=marker,
                s=42,
                label=stage,
                zorder=3,
                edgecolors="white",
                linewidths=0.6,
            )
    rejected = [s for s in timed if not s.accepted]
    if rejected:
        ax.scatter(
            [x(s) for s in rejected],
            [y(s.latency_ms) for s in rejected],
            facecolors="none",
            edgecolors="#7f7f7f",
            marker="o",
            s=42,
            label="rolled back",
            zorder=3,
        )
    predicted = [s for s in report.steps if s.predicted_latency_ms]
    if predicted:
        ax.scatter(
            [x(s) for s in predicted],
            [y(s.predicted_latency_ms) for s in predicted],
            color="#E69F00",
            marker="x",
            s=30,
            label="cost model's prediction",
            zorder=4,
        )
    if d is not None:
        # The final measurement times base and pruned afresh, so it may differ from the last
        # step's; it is the one the report's verdict rests on.
        ax.scatter(
            [report.macs_ratio * 100],
            [d.speedup],
            color="#56B4E9",
            marker="*",
            s=140,
            label=f"final: {d.speedup:.2f}× ({d.verdict})",
            zorder=5,
            edgecolors="black",
            linewidths=0.5,
        )
    where = d.deployment if d is not None else "the deployment"
    ax.set_title(f"Speed-up on {where}: {report.model} on {report.dataset}", fontsize=11)
    ax.set_xlabel("MACs kept (% of the base), pruning proceeds →")
    ax.set_ylabel("Speed-up over the base (×)")
    # Pruning lowers the MACs kept, so the trajectory reads left to right on a reversed axis.
    ax.invert_xaxis()
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.legend(fontsize=8, frameon=False, loc="best")
    return True


def plot_dynamics(report: CompressionReport, out_dir: Path) -> list[str]:
    """Draw the compression dynamics into ``out_dir`` and return the file names written.

    ``macs.png``, ``params.png`` and ``top1.png`` plot one metric each over the steps (x =
    step; stages by colour and marker with a legend; the base value as a dashed reference
    line, plus the MACs target or the accuracy budget as a dotted one; rolled-back steps
    hollow), and ``dynamics.png`` puts the three side by side. Accuracy is on the validation
    split. ``speedup.png`` plots the speed-up on the deployment (the baseline step's latency
    over each step's) against the MACs kept, with y = 1 and the latency targets as references;
    it is written only when at least two steps were timed. Nothing is written (and ``[]``
    returned) when the report has no steps.
    """
    from matplotlib.figure import Figure

    if not report.steps:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    subtitle = f"{report.model} on {report.dataset}"
    for key in ("macs", "params", "top1"):
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.add_subplot()
        _draw_panel(ax, report, key, legend=True)
        ax.set_title(f"{_PANELS[key][0]}: {subtitle}", fontsize=11)
        name = f"{key}.png"
        atomic_write_bytes(out_dir / name, _png(fig))
        written.append(name)

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ("macs", "params", "top1"), strict=True):
        _draw_panel(ax, report, key, legend=False)
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="outside lower center",
        ncol=len(handles),
        frameon=False,
        fontsize=9,
    )
    fig.suptitle(f"Compression dynamics: {subtitle}", fontsize=13)
    atomic_write_bytes(out_dir / "dynamics.png", _png(fig))
    written.append("dynamics.png")

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    if _draw_speedup(fig, report):
        atomic_write_bytes(out_dir / "speedup.png", _png(fig))
        written.append("speedup.png")
    return written


__all__ = ["PLOT_NAMES", "plot_dynamics"]
