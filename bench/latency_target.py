"""MACs targets against latency targets: what each buys in measured speed on the deployment.

    python -m bench.latency_target [--quick|--full] [--out DIR] [--models a,b] [options]

For every model, two compressions of the same randomly initialised network at the same input
size, through the library's own pipeline (``run_pipeline``), one after the other in one
process:

- ``macs``: ``target_macs`` (default 0.30) with the default ranking (score), as users ran it
  before latency targets existed; its steps are timed on the deployment too;
- ``latency``: ``target_speedup`` set to what the issue asks of a good pruner at that MACs
  target (``0.8 / target_macs``, 2.67x at 30 %), no MACs target, ranking ``score_per_ms``
  with the measured cost model.

Then the base and both pruned models are timed against each other on the deployment (default
ONNX Runtime on the CPU; ``--runtime``, ``--device`` and ``--dtype`` choose another,
``--batch`` the batch size the latency run optimises for) at every ``--batches`` size (base and
pruned interleaved run by run, the library's ``DeploymentTimer.compare``), and the report gives
each run's MACs kept, its speed-up, and the ratio of speed-up to MACs reduction (1.0: time fell
as fast as MACs; the goal is at least 0.8). The cost model's build time (a cold build: each
invocation starts from an empty table) and its prediction error over the steps are reported
too.

Accuracy is not measured here (no pretrained weights can be downloaded on this machine, and
training four 224-px ImageNet models on 2 CPU cores is out of reach): the accuracy budget is
lifted and recovery is off, so both runs cut structure only. The accuracy side of the
comparison is bench.quality's real Fashion-MNIST model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    choose_protocol,
    command_line,
    figure,
    log,
    machine,
    machine_lines,
    make_parser,
    md_table,
    parse_ints,
    write_json,
    write_text,
)

NAME = "latency_target"
DEFAULT_MODELS = (
    "resnet50",
    "mobilenet_v3_large",
    "timm:convnext_tiny",
    "timm:vit_small_patch16_224",
)


@dataclass(frozen=True)
class Protocol:
    input_size: int = 224
    steps: int = 3
    target_macs: float = 0.30
    threads: int = 2
    runs: int = 11
    final_runs: int = 21
    batches: tuple[int, ...] = (1, 32)
    # The deployment the latency run targets and every speed-up is timed on.
    runtime: str = "onnxruntime"
    device: str = "cpu"
    dtype: str = "fp32"
    batch: int = 1

    def deployment(self, batch: int, runs: int) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "device": self.device,
            "dtype": self.dtype,
            "batch_size": batch,
            # A GPU's kernels take no CPU thread count; fixing one there means nothing.
            "threads": self.threads if self.device == "cpu" else None,
            "runs": runs,
            "warmup": 3,
        }


QUICK = Protocol()
FULL = Protocol(steps=8, runs=25, final_runs=51)


@dataclass
class Run:
    model: str
    kind: str
    macs_ratio: float
    params_ratio: float
    speedup: dict[str, float]
    ratio_to_macs: dict[str, float]
    seconds: float
    steps: list[dict[str, Any]]
    cost_model: dict[str, Any] | None


def _config(model: str, proto: Protocol, kind: str) -> Any:
    from flow_compress.config import CompressionConfig

    raw: dict[str, Any] = {
        "model": model,
        "dataset": "digits",
        "in_chans": 3,
        "input_size": proto.input_size,
        "max_drop": 100.0,
        "device": proto.device,
        "prune": {"steps": proto.steps, "calibration_batches": 1},
        "truncate": {"enabled": False},
        "recovery": {"iters_per_step": 0, "trunc_iters": 0, "final_iters": 0},
        "data": {"eval_batch_size": 8, "max_eval_samples": 16},
        "latency": {"enabled": False},
        "deployment": proto.deployment(proto.batch, proto.runs),
    }
    if kind == "macs":
        raw["target_macs"] = proto.target_macs
    else:
        raw["target_speedup"] = round(0.8 / proto.target_macs, 3)
        raw["prune"]["ranking"] = "score_per_ms"
    return CompressionConfig.model_validate(raw)


def _compress(model: str, proto: Protocol, kind: str, cache: Path) -> tuple[Any, Any, Any]:
    from flow_compress.pipeline.compress import prepare
    from flow_compress.pipeline.run import run_pipeline

    cfg = _config(model, proto, kind)
    job = prepare(cfg, None)
    result = run_pipeline(job.model, job.data, cfg, latency_cache=cache)
    return cfg, job, result


def _time(base: Any, pruned: Any, proto: Protocol, shape: tuple[int, int, int]) -> dict[str, float]:
    from flow_compress.config import DeploymentConfig
    from flow_compress.measure.deployment import DeploymentTimer

    out = {}
    for batch in proto.batches:
        dep = DeploymentConfig.model_validate(proto.deployment(batch, proto.final_runs))
        out[f"b{batch}"] = round(DeploymentTimer(dep, shape).compare(base, pruned).speedup, 3)
    return out


def run_model(model: str, proto: Protocol, cache: Path) -> list[Run]:
    from flow_compress.pipeline.compress import _cost_model_stats

    runs = []
    for kind in ("macs", "latency"):
        log(f"{model}: {kind} target")
        started = time.perf_counter()
        _, job, result = _compress(model, proto, kind, cache)
        ctx = result.context
        seconds = time.perf_counter() - started
        macs, params = ctx.cost(result.model)
        shape = (job.data.in_chans, job.input_size, job.input_size)
        speed = _time(ctx.teacher, result.model, proto, shape)
        ratio = macs / ctx.base_macs
        stats = _cost_model_stats(ctx)
        runs.append(
            Run(
                model=model,
                kind=kind,
                macs_ratio=round(ratio, 4),
                params_ratio=round(params / ctx.base_params, 4),
                speedup=speed,
                ratio_to_macs={k: round(v * ratio, 3) for k, v in speed.items()},
                seconds=round(seconds, 1),
                steps=[
                    {
                        "stage": str(s.stage),
                        "macs_ratio": round(s.macs / ctx.base_macs, 4),
                        "latency_ms": s.latency_ms,
                        "predicted_ms": s.predicted_latency_ms,
                        "accepted": s.accepted,
                    }
                    for s in ctx.steps
                ],
                cost_model=stats.model_dump() if stats is not None else None,
            )
        )
        log(f"{model} {kind}: MACs {ratio:.1%}, speed-up {speed} ({seconds:.0f} s)")
    return runs


def _label(proto: Protocol) -> str:
    from flow_compress.config import DeploymentConfig

    dep = DeploymentConfig.model_validate(proto.deployment(proto.batch, proto.runs))
    return f"`{dep.label()}`" + (f" ({proto.device.upper()})" if proto.device == "cuda" else "")


def _markdown(runs: list[Run], proto: Protocol, env: dict[str, Any], wall: float) -> str:
    batches = [f"b{b}" for b in proto.batches]
    rows = []
    for r in runs:
        cm = r.cost_model or {}
        err = cm.get("mean_abs_error_pct")
        rows.append(
            [
                r.model,
                r.kind,
                f"{r.macs_ratio:.1%}",
                f"{r.params_ratio:.1%}",
                *(f"{r.speedup[b]:.2f}×" for b in batches),
                *(f"{r.ratio_to_macs[b]:.2f}" for b in batches),
                f"{cm.get('build_s', 0):.0f} s" if cm else "—",
                f"{err:.1f} %" if err is not None else "—",
                f"{r.seconds:.0f} s",
            ]
        )
    headers = [
        "model",
        "target",
        "MACs kept",
        "params kept",
        *(f"speed-up {b}" for b in batches),
        *(f"speed-up / MACs reduction {b}" for b in batches),
        "cost model build",
        "prediction error",
        "run",
    ]
    lines = [
        "# MACs targets against latency targets",
        "",
        f"`{command_line()}` — {wall / 60:.1f} min.",
        "",
        f"Input {proto.input_size} px, deployment {_label(proto)}, "
        f"{proto.steps} stage-1 steps, no recovery and no accuracy budget (structure only: "
        f"randomly initialised weights). `macs`: target_macs {proto.target_macs:.2f}, ranking "
        f"by score; `latency`: target_speedup {0.8 / proto.target_macs:.2f}×, ranking by "
        f"score per millisecond with the measured cost model (optimised for batch {proto.batch}). "
        "Speed-ups: base and pruned timed alternately, median of "
        f"{proto.final_runs} runs. Ratio: speed-up × MACs kept (1.0 = time fell as fast as "
        "MACs; goal ≥ 0.8). Cost model build: seconds spent timing layers in this run "
        "from an empty table (later jobs on the machine reuse it). Prediction error: mean "
        "|predicted − measured| of the stage-1 steps' end-to-end latency.",
        "",
        md_table(headers, rows),
        "",
        "## Machine",
        "",
        *machine_lines(env),
        "",
    ]
    return "\n".join(lines)


def _plot(runs: list[Run], proto: Protocol, out: Path) -> None:
    fig, ax = figure()
    lowest = 0.8
    for r in runs:
        base = r.steps[0]["latency_ms"]
        # Rolled-back steps (older results have no flag: every row counts) as loose points.
        kept = [s for s in r.steps if s["latency_ms"] and s.get("accepted", True)]
        dropped = [s for s in r.steps if s["latency_ms"] and not s.get("accepted", True)]
        xs = [s["macs_ratio"] * 100 for s in kept]
        ys = [base / s["latency_ms"] for s in kept]
        (line,) = ax.plot(
            xs, ys, marker="o" if r.kind == "latency" else "x", label=f"{r.model} ({r.kind})"
        )
        dropped_ys = [base / s["latency_ms"] for s in dropped]
        if dropped:
            xs_dropped = [s["macs_ratio"] * 100 for s in dropped]
            ax.scatter(xs_dropped, dropped_ys, marker="_", color=line.get_color())
        lowest = min(lowest, *ys, *dropped_ys)
    xs = [100 * x / 20 for x in range(2, 21)]
    ax.plot(xs, [100 / x for x in xs], "k:", label="speed-up = MACs reduction")
    ax.plot(xs, [80 / x for x in xs], "k--", alpha=0.5, label="goal: 0.8 × MACs reduction")
    ax.set_xlabel("MACs kept (%)")
    ax.set_ylabel(f"speed-up at batch {proto.batch} (measured per step)")
    ax.set_ylim(bottom=lowest - 0.1, top=max(6.0, *(max(r.speedup.values()) for r in runs)))
    ax.set_title("lines: kept steps; dashes: steps rolled back", fontsize=8)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.savefig(out / "speedup_vs_macs.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batches", type=parse_ints, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--runtime", default=None, help="eager, torchscript or onnxruntime")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=("fp32", "fp16"))
    parser.add_argument(
        "--batch", type=int, default=None, help="the batch size the latency run optimises for"
    )
    args: argparse.Namespace = parser.parse_args(argv)
    import torch

    proto = choose_protocol(
        args.mode,
        QUICK,
        FULL,
        input_size=args.input_size,
        threads=args.threads,
        batches=args.batches,
        steps=args.steps,
        runtime=args.runtime,
        device=args.device,
        dtype=args.dtype,
        batch=args.batch,
    )
    torch.set_num_threads(proto.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: list[Run] = []
    # A fresh table per invocation, so the build time reported is a cold build's.
    with tempfile.TemporaryDirectory(prefix="flow-latency-") as cache:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            runs.extend(run_model(model, proto, Path(cache)))
            partial = {"protocol": asdict(proto), "runs": [asdict(r) for r in runs]}
            write_json(out / "results.json", partial)
    wall = time.perf_counter() - started
    env = machine()
    write_json(
        out / "results.json",
        {
            "protocol": asdict(proto),
            "machine": env,
            "wall_s": wall,
            "runs": [asdict(r) for r in runs],
        },
    )
    write_text(out / "RESULTS.md", _markdown(runs, proto, env, wall))
    _plot(runs, proto, out)
    log(f"wrote {out}/RESULTS.md")


if __name__ == "__main__":
    main()
