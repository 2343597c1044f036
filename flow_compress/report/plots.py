"""The compression-dynamics plots of a report: MACs, parameters and validation top-1 per step.

matplotlib's object-oriented API on Agg canvases (``matplotlib.figure.Figure``), never
``pyplot``: no global backend switch, no GUI, safe in worker processes and threads.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from flow_compress.artifacts import atomic_write_bytes
from flow_compress.schema import CompressionReport, Stage, StepRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOT_NAMES = ("macs.png", "params.png", "top1.png", "dynamics.png")

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
    if key == "macs":
        ax.axhline(
            base_value * report.config.target_macs,
            color="#CC79A7",
            linestyle=":",
            linewidth=1.4,
            label=f"MACs target ({report.config.target_macs * 100:.0f} % of base)",
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


def plot_dynamics(report: CompressionReport, out_dir: Path) -> list[str]:
    """Draw the compression dynamics into ``out_dir`` and return the file names written.

    ``macs.png``, ``params.png`` and ``top1.png`` plot one metric each over the steps (x =
    step; stages by colour and marker with a legend; the base value as a dashed reference
    line, plus the MACs target or the accuracy budget as a dotted one; rolled-back steps
    hollow), and ``dynamics.png`` puts the three side by side. Accuracy is on the validation
    split. Nothing is written (and ``[]`` returned) when the report has no steps.
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
    return written


__all__ = ["PLOT_NAMES", "plot_dynamics"]
