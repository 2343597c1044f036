"""Real speed-up: base against pruned models, timed side by side in one process.

    python -m bench.latency [--quick|--full] [--out DIR] [options]

The base model (the cached one bench.quality uses) is compressed with IDAP++ to a MACs
target once per ``round_to`` variant (no rounding, and channel counts rounded to multiples
of 8, which GPU kernels and vectorised CPU code prefer). Each pruned model is then timed
against the base with the library's ``compare_latency``: eager PyTorch, TorchScript and ONNX
Runtime, batch 1 and batch 32, warm-up first, then the median of ``--runs`` (at least 50)
timed runs, base and pruned interleaved run by run so drift hits both; on CUDA every timed
run is bracketed by ``torch.cuda.synchronize``. The base is re-timed for every variant in the
same process, so each ratio compares numbers taken minutes apart at most. Where CUDA is
available the same script also times on the GPU and names the card; ONNX Runtime rows say
when they fell back to the CPU.

The speed-up is reported next to the MACs ratio it would be if time were proportional to
MACs (``1 / macs_ratio``), which is the gap the issue asks about.
"""

from __future__ import annotations

import copy
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
    parse_ints,
    schedule_config,
    train_config,
    write_json,
    write_text,
)

NAME = "latency"
RUNTIMES = ("eager", "torchscript", "onnxruntime")


@dataclass(frozen=True)
class Protocol:
    """How the pruned models are made and how they are timed."""

    target: float
    round_to: tuple[int, ...]  # 0 means no rounding
    steps: int
    iters_per_step: int
    trunc_iters: int
    final_iters: int
    max_layers: int
    batch_size: int
    max_eval_samples: int | None
    batch_sizes: tuple[int, ...]
    warmup: int
    runs: int


# The pruned *structure* is what latency depends on; short recovery keeps the quick mode
# fast (the accuracy of these models is bench.quality's business, not this one's).
QUICK = Protocol(
    target=0.25,
    round_to=(0, 8),
    steps=4,
    iters_per_step=10,
    trunc_iters=10,
    final_iters=20,
    max_layers=1,
    batch_size=64,
    max_eval_samples=1000,
    batch_sizes=(1, 32),
    warmup=10,
    runs=50,
)
# Full: the library's default schedule (8 stage-1 steps, up to 3 blocks truncated) on the
# whole data, more timed runs; recovery is shortened for the same reason as above, enough for
# stage 2's accuracy test to see a trained model.
FULL = Protocol(
    target=0.25,
    round_to=(0, 8),
    steps=8,
    iters_per_step=40,
    trunc_iters=40,
    final_iters=100,
    max_layers=3,
    batch_size=128,
    max_eval_samples=None,
    batch_sizes=(1, 32),
    warmup=20,
    runs=200,
)


def compress_variant(
    proto: Protocol,
    round_to: int,
    *,
    arch: str,
    dataset: str,
    in_chans: int,
    input_size: int,
    device: str,
    weights: Path,
    work: Path,
) -> tuple[Any, Any, Any]:
    """Compress ``weights`` with IDAP++ (``round_to`` 0 = none); returns the report, the base
    model and the pruned model, rebuilt on the CPU from the ``plan.json`` and
    ``weights.safetensors`` the compression wrote (the library's replay, as users load it)."""
    from flow_compress.arch.models import build_model, load_weights
    from flow_compress.config import CompressionConfig
    from flow_compress.pipeline import compress
    from flow_compress.plan import read_plan, rebuild

    # The budget stays lifted: latency is measured at the asked-for cost.
    raw = schedule_config(
        proto,
        arch=arch,
        dataset=dataset,
        in_chans=in_chans,
        input_size=input_size,
        device=device,
    )
    raw["prune"]["round_to"] = round_to or None
    raw.update(
        data={"max_eval_samples": proto.max_eval_samples},
        export={"formats": []},
        latency={"enabled": False},
    )
    cfg = CompressionConfig.model_validate(raw)
    out = work / f"round{round_to}"
    report = compress(cfg, weights=weights, out_dir=out, overwrite=True)
    plan = read_plan(out / "plan.json")
    pruned = rebuild(plan, out / "weights.safetensors")
    base = build_model(arch, plan.num_classes, in_chans=in_chans, input_size=input_size)
    load_weights(base, weights)
    return report, base.eval(), pruned.eval()


def time_pair(
    base: Any,
    pruned: Any,
    input_shape: tuple[int, int, int],
    proto: Protocol,
    device: str,
    runtimes: Sequence[str],
    threads: int | None,
    work: Path,
) -> list[dict[str, Any]]:
    """``compare_latency`` over every runtime x batch size; one dict per record."""
    import torch

    from flow_compress.config import LatencyConfig
    from flow_compress.measure.latency import compare_latency

    cfg = LatencyConfig(
        batch_sizes=proto.batch_sizes,
        runtimes=tuple(runtimes),  # type: ignore[arg-type]
        warmup=proto.warmup,
        runs=proto.runs,
        threads=threads,
    )
    records = compare_latency(
        copy.deepcopy(base), copy.deepcopy(pruned), input_shape, cfg, torch.device(device), work
    )
    return [r.model_dump() for r in records]


def markdown(payload: dict[str, Any]) -> str:
    proto = payload["protocol"]
    lines = [
        f"# Real speed-up ({payload['mode']} mode)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Finished: {payload['finished']}, wall time {payload['wall_s'] / 60:.1f} min",
        "",
        f"Base model: {payload['model']['arch']} on `{payload['model']['dataset']}` at "
        f"{payload['model']['input_size']} px ({payload['base_model']}), compressed by IDAP++ "
        f"(stage 1 + stage 2 + fine-tune) to a {proto['target']:.0%} MACs target, once per "
        "`round_to` variant. Timing: float32, "
        f"{proto['warmup']} warm-up runs, then the median of {proto['runs']} timed runs per "
        "model, base and pruned interleaved in one process; speed-up = base ms / pruned ms. "
        "`1/MACs` is the speed-up that time proportional to MACs would give.",
        "",
        "## Pruned models",
        "",
        md_table(
            ["round_to", "MACs kept", "params kept", "blocks removed", "val top-1 (last step)"],
            [
                [
                    v["round_to"] or "none",
                    f"{v['macs_ratio']:.1%} ({v['macs'] / 1e6:.2f} M of "
                    f"{v['base_macs'] / 1e6:.2f} M)",
                    f"{v['params_ratio']:.1%}",
                    v["layers_removed"],
                    f"{v['val_top1']:.2f}",
                ]
                for v in payload["variants"]
            ],
        ),
        "",
    ]
    for dev in payload["devices"]:
        lines += [f"## {dev['label']}", ""]
        rows = []
        for v in payload["variants"]:
            for rec in v["latency"].get(dev["device"], []):
                rows.append(
                    [
                        v["round_to"] or "none",
                        rec["runtime"],
                        rec["batch_size"],
                        f"{rec['base_ms']:.3f}",
                        f"{rec['pruned_ms']:.3f}",
                        f"**{rec['speedup']:.2f}×**",
                        f"{1 / v['macs_ratio']:.2f}×",
                        rec["device"],
                    ]
                )
        lines.append(
            md_table(
                [
                    "round_to",
                    "runtime",
                    "batch",
                    "base ms",
                    "pruned ms",
                    "speed-up",
                    "1/MACs",
                    "ran on",
                ],
                rows,
            )
        )
        lines += ["", f"![speed-ups on {dev['device']}](speedup_{dev['slug']}.png)", ""]
    lines += ["## Machine", "", *machine_lines(payload["machine"]), ""]
    return "\n".join(lines)


def plot_speedups(payload: dict[str, Any], device: str, path: Path) -> None:
    """Grouped bars: speed-up per runtime x batch, one bar per round_to variant; dashed lines
    at 1/MACs of each variant."""
    variants = payload["variants"]
    keys: list[tuple[str, int]] = []
    for v in variants:
        for rec in v["latency"].get(device, []):
            key = (rec["runtime"], rec["batch_size"])
            if key not in keys:
                keys.append(key)
    if not keys:
        return
    fig, ax = figure(8.0, 4.5)
    width = 0.8 / max(1, len(variants))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for i, v in enumerate(variants):
        by_key = {(r["runtime"], r["batch_size"]): r["speedup"] for r in v["latency"][device]}
        xs = [k + (i - (len(variants) - 1) / 2) * width for k in range(len(keys))]
        label = f"round_to {v['round_to'] or 'none'} ({v['macs_ratio']:.1%} MACs)"
        ax.bar(
            xs,
            [by_key.get(k, 0.0) for k in keys],
            width,
            label=label,
            color=colors[i % len(colors)],
        )
        ax.axhline(1 / v["macs_ratio"], color=colors[i % len(colors)], linestyle="--", linewidth=1)
    ax.axhline(1.0, color="0.2", linewidth=0.8)
    ax.set_xticks(range(len(keys)), [f"{r}\nbatch {b}" for r, b in keys], fontsize=8)
    ax.set_ylabel("speed-up (base ms / pruned ms)")
    ax.set_title(f"Measured speed-up on {device} (dashed: 1/MACs ratio)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(NAME, "Measured speed-up of pruned models against their MACs ratio.")
    add_base_model_args(parser)
    g = parser.add_argument_group("protocol (defaults: the mode's)")
    g.add_argument("--target", type=float, help="MACs fraction to keep")
    g.add_argument("--round-to", type=parse_ints, help="variants, 0 = none, e.g. 0,8")
    g.add_argument("--runs", type=int, help="timed runs per model (at least 50)")
    g.add_argument("--warmup", type=int)
    g.add_argument("--batch-sizes", type=parse_ints)
    g.add_argument("--runtimes", default=",".join(RUNTIMES))
    g.add_argument(
        "--time-on",
        default="auto",
        help="devices to time on: auto (cpu, plus cuda when present), or a list like cpu,cuda",
    )
    g.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    args = parser.parse_args(argv)

    import torch

    proto = choose_protocol(
        args.mode,
        QUICK,
        FULL,
        target=args.target,
        round_to=args.round_to,
        runs=args.runs,
        warmup=args.warmup,
        batch_sizes=args.batch_sizes,
    )
    if proto.runs < 50:
        parser.error("--runs must be at least 50 (the median of >= 50 timed runs)")
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        parser.error(f"unknown runtime(s) {bad}; valid: {', '.join(RUNTIMES)}")
    if args.time_on == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.time_on.split(",") if d.strip()]
    started = time.perf_counter()
    base_model = ensure_base_model(
        train_config(
            args.arch, args.dataset, args.in_chans, args.input_size, args.base_epochs, args.device
        ),
        base_weights=args.base_weights,
    )
    log(f"latency: base model {base_model.source}")
    shape = (args.in_chans, args.input_size, args.input_size)
    variants: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        for rt in proto.round_to:
            log(f"latency: compressing with round_to={rt or 'none'}")
            report, base, pruned = compress_variant(
                proto,
                rt,
                arch=args.arch,
                dataset=args.dataset,
                in_chans=args.in_chans,
                input_size=args.input_size,
                device=args.device,
                weights=base_model.weights,
                work=work,
            )
            variant: dict[str, Any] = {
                "round_to": rt,
                "macs": report.pruned.macs,
                "base_macs": report.base.macs,
                "macs_ratio": report.macs_ratio,
                "params": report.pruned.params,
                "params_ratio": report.params_ratio,
                "layers_removed": sum(1 for s in report.steps if s.stage == "Layer Trunc"),
                "val_top1": report.steps[-1].top1,
                "test_top1": report.pruned.top1,
                "compress_s": report.timings_s,
                "latency": {},
            }
            for dev in devices:
                log(f"latency: timing round_to={rt or 'none'} on {dev}")
                variant["latency"][dev] = time_pair(
                    base, pruned, shape, proto, dev, runtimes, args.threads, work / f"t-{dev}"
                )
                for rec in variant["latency"][dev]:
                    log(
                        f"  {rec['runtime']:<12} b{rec['batch_size']:<3} base "
                        f"{rec['base_ms']:.3f} ms  pruned {rec['pruned_ms']:.3f} ms  "
                        f"{rec['speedup']:.2f}x"
                    )
            variants.append(variant)

    from flow_compress.measure.environment import describe_device

    payload: dict[str, Any] = {
        "benchmark": NAME,
        "mode": args.mode,
        "command": command_line(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": round(time.perf_counter() - started, 1),
        "model": {
            "arch": args.arch,
            "dataset": args.dataset,
            "in_chans": args.in_chans,
            "input_size": args.input_size,
        },
        "base_model": base_model.source,
        "protocol": asdict(proto),
        "runtimes": runtimes,
        "devices": [
            {"device": d, "slug": d.replace(":", ""), "label": describe_device(d)} for d in devices
        ],
        "variants": variants,
        "machine": machine(),
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", payload)
    for dev in payload["devices"]:
        plot_speedups(payload, dev["device"], out / f"speedup_{dev['slug']}.png")
    write_text(out / "RESULTS.md", markdown(payload))
    log(f"latency: wrote {out / 'results.json'}, {out / 'RESULTS.md'} and plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
