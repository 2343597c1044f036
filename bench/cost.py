"""Pipeline cost: where the wall time of one compression goes.

    python -m bench.cost [--quick|--full] [--out DIR] [options]

One IDAP++ compression of the cached base model, run exactly as ``flow-compress compress``
runs it (``compress``: both stages, final fine-tune, TorchScript + ONNX export with parity
checks, plan replay, latency timing, report). The library times itself per kind of work
(``CompressionReport.timings_s``): ``scoring`` (calibration forward passes and scores, both
stages), ``surgery`` (DepGraph construction and channel removal, block replacement),
``recovery`` (every distillation step), ``evaluation`` (validation passes and the final test
evaluation), ``export`` (exports, parity checks, plan replay), ``latency`` (the report's
side-by-side timing) and ``load`` (dataset and weights). The wall clock around ``compress``
is measured here; what the library's timers do not cover (MACs counting, model copies,
writing the report) is shown as "other". The paper never measured its own overhead: the
"scoring + surgery" share answers that.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    add_base_model_args,
    choose_protocol,
    command_line,
    ensure_base_model,
    figure,
    log,
    machine,
    machine_lines,
    make_parser,
    md_table,
    schedule_config,
    train_config,
    write_json,
    write_text,
)

NAME = "cost"

# Disjoint kinds of work timed by the library, in pipeline order, with their labels.
PARTS: tuple[tuple[str, str], ...] = (
    ("load", "load (dataset, weights)"),
    ("scoring", "calibration + scoring"),
    ("surgery", "graph surgery"),
    ("recovery", "recovery training"),
    ("evaluation", "evaluation"),
    ("export", "export + parity + plan replay"),
    ("latency", "latency timing (report)"),
)
PHASES: tuple[tuple[str, str], ...] = (
    ("stage1_total", "stage 1 (filter pruning)"),
    ("stage2_total", "stage 2 (layer truncation)"),
    ("finetune_total", "final fine-tune"),
)


@dataclass(frozen=True)
class Protocol:
    target: float
    steps: int
    iters_per_step: int
    trunc_iters: int
    final_iters: int
    max_layers: int
    batch_size: int
    max_eval_samples: int | None
    latency_runs: int


QUICK = Protocol(
    target=0.25,
    steps=4,
    iters_per_step=30,
    trunc_iters=20,
    final_iters=120,
    max_layers=1,
    batch_size=64,
    max_eval_samples=2000,
    latency_runs=50,
)
# Every library default (what `flow-compress compress` does unless told otherwise).
FULL = Protocol(
    target=0.25,
    steps=8,
    iters_per_step=150,
    trunc_iters=100,
    final_iters=600,
    max_layers=3,
    batch_size=128,
    max_eval_samples=None,
    latency_runs=50,
)


def breakdown(timings: dict[str, float], wall_s: float) -> list[dict[str, Any]]:
    """Seconds and share of ``wall_s`` per kind of work, plus "other" (untimed remainder)."""
    rows = []
    for key, label in PARTS:
        seconds = float(timings.get(key, 0.0))
        rows.append({"part": key, "label": label, "seconds": seconds, "share": seconds / wall_s})
    other = max(0.0, wall_s - sum(r["seconds"] for r in rows))
    rows.append(
        {
            "part": "other",
            "label": "other (MACs counting, copies, report)",
            "seconds": other,
            "share": other / wall_s,
        }
    )
    return rows


def markdown(payload: dict[str, Any]) -> str:
    proto = payload["protocol"]
    r = payload["result"]
    lines = [
        f"# Pipeline cost ({payload['mode']} mode)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Finished: {payload['finished']}",
        "",
        f"One IDAP++ compression of {payload['model']['arch']} on `{payload['model']['dataset']}`"
        f" ({payload['base_model']}) to {proto['target']:.0%} of base MACs (accuracy budget "
        f"{payload['max_drop']:g} points) on "
        f"`{payload['device_used']}`: {proto['steps']} stage-1 steps × {proto['iters_per_step']}"
        f" recovery steps, stage 2 up to {proto['max_layers']} block(s) × {proto['trunc_iters']}"
        f" steps per try, final fine-tune {proto['final_iters']} steps, batch "
        f"{proto['batch_size']}, evaluation on {proto['max_eval_samples'] or 'all'} images per "
        "split; TorchScript + ONNX export with parity checks; latency timing "
        f"({proto['latency_runs']} runs per model, 3 runtimes × batch 1 and 32).",
        "",
        f"Result: top-1 {r['base_top1']:.2f} → {r['top1']:.2f} at {r['macs_ratio']:.1%} of base "
        f"MACs; {r['total_steps']} optimisation steps; wall time **{payload['wall_s']:.1f} s**.",
        "",
        "## Wall time by kind of work",
        "",
        md_table(
            ["work", "seconds", "share of wall time"],
            [[p["label"], f"{p['seconds']:.1f}", f"{p['share']:.1%}"] for p in payload["parts"]]
            + [["**total (wall clock)**", f"**{payload['wall_s']:.1f}**", "100.0%"]],
        ),
        "",
        f"**Scoring + surgery: {payload['scoring_surgery_s']:.1f} s = "
        f"{payload['scoring_surgery_share']:.1%} of the wall time** "
        f"({payload['scoring_surgery_share_of_compression']:.1%} of the compression proper, "
        "i.e. without export and latency timing).",
        "",
        "![time per kind of work](cost.png)",
        "",
        "## Wall time by pipeline phase",
        "",
        md_table(
            ["phase", "seconds", "share of wall time"],
            [[p["label"], f"{p['seconds']:.1f}", f"{p['share']:.1%}"] for p in payload["phases"]],
        ),
        "",
        "## Machine",
        "",
        *machine_lines(payload["machine"]),
        "",
    ]
    return "\n".join(lines)


def plot(parts: Sequence[dict[str, Any]], wall_s: float, path: Path) -> None:
    fig, ax = figure(7.5, 3.8)
    labels = [p["label"] for p in parts]
    secs = [p["seconds"] for p in parts]
    colors = ["tab:red" if p["part"] in ("scoring", "surgery") else "tab:blue" for p in parts]
    bars = ax.barh(range(len(parts)), secs, color=colors)
    for bar, p in zip(bars, parts, strict=True):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {p['share']:.1%}",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(parts)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max([*secs, 1e-09]) * 1.2)
    ax.set_title(f"One compression: {wall_s:.0f} s wall time (red: IDAP++'s own overhead)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(NAME, "Wall time per stage of one compression.")
    add_base_model_args(parser)
    g = parser.add_argument_group("protocol (defaults: the mode's)")
    g.add_argument("--target", type=float)
    g.add_argument("--steps", type=int)
    g.add_argument("--iters-per-step", type=int)
    g.add_argument("--final-iters", type=int)
    g.add_argument("--max-eval-samples", type=int)
    g.add_argument(
        "--max-drop",
        type=float,
        default=100.0,
        help="accuracy budget in points (default 100: lifted, so the run walks all the way "
        "to the target and the cost is that of reaching it)",
    )
    args = parser.parse_args(argv)

    from flow_compress.config import CompressionConfig
    from flow_compress.pipeline import compress

    proto = choose_protocol(
        args.mode,
        QUICK,
        FULL,
        target=args.target,
        steps=args.steps,
        iters_per_step=args.iters_per_step,
        final_iters=args.final_iters,
        max_eval_samples=args.max_eval_samples,
    )
    base = ensure_base_model(
        train_config(
            args.arch, args.dataset, args.in_chans, args.input_size, args.base_epochs, args.device
        ),
        base_weights=args.base_weights,
    )
    log(f"cost: base model {base.source}")
    raw = schedule_config(
        proto,
        arch=args.arch,
        dataset=args.dataset,
        in_chans=args.in_chans,
        input_size=args.input_size,
        device=args.device,
        max_drop=args.max_drop,
    )
    raw.update(
        data={"max_eval_samples": proto.max_eval_samples},
        latency={"runs": proto.latency_runs},
    )
    cfg = CompressionConfig.model_validate(raw)
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        log("cost: compressing")
        start = time.perf_counter()
        report = compress(cfg, weights=base.weights, out_dir=Path(tmp) / "out")
        wall = time.perf_counter() - start
    timings = dict(report.timings_s)
    parts = breakdown(timings, wall)
    overhead = timings.get("scoring", 0.0) + timings.get("surgery", 0.0)
    compression = wall - timings.get("export", 0.0) - timings.get("latency", 0.0)
    phases = [
        {
            "phase": key,
            "label": label,
            "seconds": timings.get(key, 0.0),
            "share": timings.get(key, 0.0) / wall,
        }
        for key, label in PHASES
    ]
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "mode": args.mode,
        "command": command_line(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": {"arch": args.arch, "dataset": args.dataset, "input_size": args.input_size},
        "base_model": base.source,
        "protocol": asdict(proto),
        "device_used": report.environment.get("device_used", "?"),
        "max_drop": args.max_drop,
        "wall_s": round(wall, 2),
        "timings_s": timings,
        "parts": parts,
        "phases": phases,
        "scoring_surgery_s": round(overhead, 3),
        "scoring_surgery_share": overhead / wall,
        "scoring_surgery_share_of_compression": overhead / compression if compression > 0 else 0,
        "result": {
            "base_top1": report.base.top1,
            "top1": report.pruned.top1,
            "macs_ratio": report.macs_ratio,
            "recovery_iterations": dict(report.recovery_iterations),
            "total_steps": sum(report.recovery_iterations.values()),
            "layers_removed": sum(1 for s in report.steps if s.stage == "Layer Trunc"),
        },
        "machine": machine(),
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", payload)
    plot(parts, wall, out / "cost.png")
    write_text(out / "RESULTS.md", markdown(payload))
    log(
        f"cost: {wall:.1f} s wall, scoring + surgery {overhead:.1f} s "
        f"({payload['scoring_surgery_share']:.1%}); wrote {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
