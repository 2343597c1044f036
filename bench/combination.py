"""Pruning combined with distillation and quantization: the paper's combination table.

    python -m bench.combination [--quick|--full] [--out DIR] [options]

The same cached base model (``bench.common.ensure_base_model``) is compressed with IDAP++ to
the same MACs target with the same schedule and the same optimisation steps three times, once
per recovery loss of ``RecoveryConfig.distillation``:

- ``kd`` (the library's default): KL to the base model's logits (T = 4) plus cross-entropy;
- ``kd_features``: ``kd`` plus feature matching at ``--feature-taps`` (default layer3, layer4);
- ``none``: plain cross-entropy on the labels.

The accuracy budget is lifted (100 points) so no run rolls back differently from the others:
the three differ in the recovery loss alone. The ``kd`` run also builds the INT8 static
(calibrated on the validation split), INT8 dynamic and FP16 ONNX variants
(``QuantizeConfig``), each checked against its FP32 model by the library.

Then every ONNX file (the base model exported here, the three pruned FP32 models and the three
quantized ones) is timed with ONNX Runtime on the CPU in one process, round-robin, at batch 1
and 32 (``flow_compress.measure.latency.time_onnx_files``), and on CUDA too where ONNX Runtime
has the CUDA provider. The table has GMACs, test top-1/top-5, file size and latency per row; quick
mode evaluates on the first ``max_eval_samples`` test images (the numbers say so).

Writes ``results.json``, ``RESULTS.md``, ``combination.png`` and each run's report under
``reports/`` to ``bench/results/combination/`` (or ``--out``).
"""

from __future__ import annotations

import math
import shutil
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

NAME = "combination"
DISTILLATIONS = ("kd", "kd_features", "none")
DEFAULT_DISTILLATION = "kd"
QUANTIZE_MODES = ("int8_static", "int8_dynamic", "fp16")


@dataclass(frozen=True)
class Protocol:
    """How the pruned models are made and timed (identical for every distillation choice)."""

    target: float
    steps: int
    iters_per_step: int
    trunc_iters: int
    final_iters: int
    max_layers: int
    batch_size: int
    max_train_samples: int | None
    max_eval_samples: int | None
    feature_taps: tuple[str, ...]
    calibration_samples: int
    min_agreement: float
    batch_sizes: tuple[int, ...]
    warmup: int
    runs: int
    threads: int | None  # ONNX Runtime intra-op threads; None = its default (all cores)


# About 1.5 minutes per compression on 2 CPU cores (5 minutes in all): the table's shape and
# the relative cost of the variants are what quick mode shows; accuracy differences between
# the recovery losses need the full protocol (the table prints the standard error).
QUICK = Protocol(
    target=0.3,
    steps=3,
    iters_per_step=50,
    trunc_iters=25,
    final_iters=200,
    max_layers=1,
    batch_size=64,
    max_train_samples=None,
    max_eval_samples=5000,
    feature_taps=("layer3", "layer4"),
    calibration_samples=256,
    min_agreement=97.0,
    batch_sizes=(1, 32),
    warmup=10,
    runs=50,
    # One thread: on a small shared machine a second ORT thread that gets descheduled stalls
    # every parallel FP32 kernel (measured 4x slower at batch 32), which would flatter INT8.
    threads=1,
)
FULL = Protocol(
    target=0.3,
    steps=6,
    iters_per_step=150,
    trunc_iters=80,
    final_iters=600,
    max_layers=2,
    batch_size=128,
    max_train_samples=None,
    max_eval_samples=None,
    feature_taps=("layer3", "layer4"),
    calibration_samples=512,
    min_agreement=97.0,
    batch_sizes=(1, 32),
    warmup=20,
    runs=200,
    threads=None,
)

DISTILLATION_LABELS = {
    "kd": "Pruned + KD",
    "kd_features": "Pruned + KD features",
    "none": "Pruned + CE only",
}
QUANT_LABELS = {
    "int8_static": "Pruned + KD + INT8 static",
    "int8_dynamic": "Pruned + KD + INT8 dynamic",
    "fp16": "Pruned + KD + FP16",
}


def compression_config(
    proto: Protocol,
    distillation: str,
    *,
    arch: str,
    dataset: str,
    in_chans: int,
    input_size: int,
    device: str,
) -> Any:
    """The ``CompressionConfig`` of one run; only ``recovery.distillation`` (and the taps it
    needs) and ``quantize`` (on the default run) differ between runs."""
    from flow_compress.config import CompressionConfig

    raw = schedule_config(
        proto,
        arch=arch,
        dataset=dataset,
        in_chans=in_chans,
        input_size=input_size,
        device=device,
    )
    recovery: dict[str, Any] = raw["recovery"]
    recovery["distillation"] = distillation
    if distillation == "kd_features":
        recovery["feature_taps"] = list(proto.feature_taps)
    quantize: dict[str, Any] = {}
    if distillation == DEFAULT_DISTILLATION:
        quantize = {
            "modes": list(QUANTIZE_MODES),
            "calibration_samples": proto.calibration_samples,
            "min_agreement": proto.min_agreement,
        }
    raw.update(
        data={
            "max_train_samples": proto.max_train_samples,
            "max_eval_samples": proto.max_eval_samples,
        },
        # The benchmark times every file itself, together, in one process.
        latency={"enabled": False},
        quantize=quantize,
    )
    return CompressionConfig.model_validate(raw)


def time_all(
    files: dict[str, Path], input_shape: tuple[int, int, int], proto: Protocol, device: str
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """ONNX Runtime latency of every file, all in this process: CPU always, CUDA where the
    provider exists and ``device`` allows it. Returns device labels and ``{name: {key: ms}}``
    with keys like ``cpu@b1``."""
    import onnxruntime as ort
    import torch

    from flow_compress.config import LatencyConfig
    from flow_compress.measure.latency import time_onnx_files

    cfg = LatencyConfig(
        batch_sizes=proto.batch_sizes, warmup=proto.warmup, runs=proto.runs, threads=proto.threads
    )
    devices = ["cpu"]
    cuda_ok = torch.cuda.is_available() and "CUDAExecutionProvider" in (
        ort.get_available_providers()
    )
    if cuda_ok and device != "cpu":
        devices.append("cuda")
    labels: dict[str, str] = {}
    out: dict[str, dict[str, float]] = {name: {} for name in files}
    for dev in devices:
        log(f"timing {len(files)} ONNX files with ONNX Runtime on {dev}")
        label, measured = time_onnx_files(files, input_shape, cfg, dev)
        labels[dev] = label
        for name, by_batch in measured.items():
            out[name] |= {f"{dev}@b{b}": round(ms, 4) for b, ms in by_batch.items()}
    return labels, out


def build_rows(
    reports: dict[str, Any],
    sizes: dict[str, int],
    latency: dict[str, dict[str, float]],
) -> list[dict[str, Any]]:
    """Table rows in the paper's order: baseline, the pruned model per distillation choice,
    then the quantized variants of the default (KD) pruned model."""
    default = reports[DEFAULT_DISTILLATION]
    base_lat = latency["base"]

    def speedup(name: str) -> dict[str, float]:
        return {
            k: round(base_lat[k] / v, 3)
            for k, v in latency[name].items()
            if v > 0 and k in base_lat
        }

    rows: list[dict[str, Any]] = [
        {
            "key": "base",
            "variant": "Baseline (FP32)",
            "precision": "fp32",
            "distillation": None,
            "macs": default.base.macs,
            "top1": default.base.top1,
            "top5": default.base.top5,
            "size_bytes": sizes["base"],
            "latency_ms": base_lat,
            "speedup": speedup("base"),
        }
    ]
    for name in DISTILLATIONS:
        rep = reports.get(name)
        if rep is None:
            continue
        rows.append(
            {
                "key": name,
                "variant": f"{DISTILLATION_LABELS[name]} (FP32)",
                "precision": "fp32",
                "distillation": name,
                "macs": rep.pruned.macs,
                "top1": rep.pruned.top1,
                "top5": rep.pruned.top5,
                "size_bytes": sizes[name],
                "latency_ms": latency[name],
                "speedup": speedup(name),
            }
        )
    for q in default.quantized:
        rows.append(
            {
                "key": q.mode,
                "variant": QUANT_LABELS[q.mode],
                "precision": "fp16" if q.mode == "fp16" else "int8",
                "distillation": DEFAULT_DISTILLATION,
                "macs": default.pruned.macs,
                "top1": q.top1,
                "top5": q.top5,
                "size_bytes": q.size_bytes,
                "latency_ms": latency[q.mode],
                "speedup": speedup(q.mode),
                "agreement": q.agreement,
                "max_abs_diff": q.max_abs_diff,
            }
        )
    return rows


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r["latency_ms"]))
    headers = ["Variant", "GMACs", "Top-1 (%)", "Top-5 (%)", "Size (MB)"]
    headers += [f"{k} (ms)" for k in keys] + [f"speed-up {k}" for k in keys]
    body = []
    for r in rows:
        line: list[object] = [
            r["variant"],
            f"{r['macs'] / 1e9:.4f}",
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            f"{r['size_bytes'] / 1e6:.2f}",
        ]
        line += [f"{r['latency_ms'][k]:.3f}" if k in r["latency_ms"] else "-" for k in keys]
        line += [f"{r['speedup'][k]:.2f}×" if k in r["speedup"] else "-" for k in keys]
        body.append(line)
    proto = payload["protocol"]
    checks = [
        [r["variant"], f"{r['agreement']:.2f} %", f"{r['max_abs_diff']:.3g}"]
        for r in rows
        if "agreement" in r
    ]
    evaluated = (
        f"the first {proto['max_eval_samples']:,} test images"
        if proto["max_eval_samples"]
        else "the full test split"
    )
    n_test = payload.get("test_images") or 0
    top1 = rows[0]["top1"] / 100.0
    # Binomial standard error of a top-1 estimate on n images: the scale below which
    # differences between rows are noise.
    stderr = 100.0 * math.sqrt(top1 * (1.0 - top1) / n_test) if n_test else float("nan")
    lines = [
        "# Pruning combined with distillation and quantization",
        "",
        f"`{payload['command']}` ({payload['mode']} mode), {payload['wall_s'] / 60:.1f} min.",
        "",
        f"Base model: {payload['base']['source']}. Every pruned row is IDAP++ to "
        f"{proto['target'] * 100:.0f} % of the base MACs with the same schedule "
        f"({proto['steps']} stage-1 steps × {proto['iters_per_step']} recovery steps, up to "
        f"{proto['max_layers']} truncated block(s) × {proto['trunc_iters']}, "
        f"{proto['final_iters']} fine-tune steps, budget lifted); only the recovery loss "
        "differs. The quantized rows are variants of the KD model. Accuracy on "
        f"{evaluated}; size is the ONNX file on disk; latency is ONNX Runtime, median of "
        f"{proto['runs']} runs after {proto['warmup']} warm-up, "
        f"{proto['threads'] or 'default'} intra-op thread(s), every file timed round-robin in "
        "one process; speed-up against the baseline.",
        "",
        md_table(headers, body),
        "",
        f"Top-1 is measured on {n_test:,} images: one standard error is about "
        f"{stderr:.2f} points, so smaller differences between rows are noise.",
        "",
        "Quantized variants against the FP32 KD model (validation images, the library's check):",
        "",
        md_table(["Variant", "Top-1 agreement", "Max logit diff"], checks),
        "",
        "Devices: " + "; ".join(f"{k}: {v}" for k, v in payload["devices"].items()) + ".",
        "",
        "![combination](combination.png)",
        "",
        "## Machine",
        "",
        *machine_lines(payload["machine"]),
        "",
    ]
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Top-1 against CPU latency at the largest batch (log scale), one marker per row, named
    in the legend (markers by precision, so coincident points stay readable)."""
    rows = payload["rows"]
    keys = [k for k in dict.fromkeys(k for r in rows for k in r["latency_ms"]) if "cpu" in k]
    key = keys[-1] if keys else None
    fig, ax = figure(8.5, 4.8)
    markers = {"fp32": "o", "int8": "s", "fp16": "^"}
    # Okabe-Ito, colour-blind safe; one colour per row.
    colors = ["#000000", "#0072B2", "#56B4E9", "#009E73", "#D55E00", "#E69F00", "#CC79A7"]
    for i, r in enumerate(rows):
        x = r["latency_ms"].get(key) if key else r["size_bytes"] / 1e6
        ax.scatter(
            [x],
            [r["top1"]],
            color=colors[i % len(colors)],
            marker="D" if r["key"] == "base" else markers.get(r["precision"], "o"),
            s=60,
            zorder=3,
            edgecolors="white",
            linewidths=0.6,
            label=f"{r['variant']}: {r['size_bytes'] / 1e6:.1f} MB",
        )
    if key:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")

        # Plain numbers at 1, 2 and 5 times powers of ten, instead of 2x10^0 labels.
        def tick(v: float, _pos: int) -> str:
            lead = f"{v:.0e}"[0]
            return f"{v:g}" if lead in "125" else ""

        ax.xaxis.set_major_formatter(FuncFormatter(tick))
        ax.xaxis.set_minor_formatter(FuncFormatter(tick))
    ax.set_xlabel(f"ONNX Runtime latency, {key} (ms, log scale)" if key else "ONNX size (MB)")
    ax.set_ylabel("Top-1 (%)")
    ax.set_title("Pruning x distillation x quantization")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def run(
    proto: Protocol,
    *,
    arch: str,
    dataset: str,
    in_chans: int,
    input_size: int,
    device: str,
    weights: Path,
    out: Path,
    distillations: Sequence[str] = DISTILLATIONS,
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, Any]]:
    """Compress ``weights`` once per distillation choice, quantize the default one, time every
    ONNX file together; returns the rows, the device labels and the reports by choice."""
    import torch

    from flow_compress.arch.models import build_model, load_weights
    from flow_compress.export import get_quantizer
    from flow_compress.export.onnx import export_onnx
    from flow_compress.pipeline import compress
    from flow_compress.plan import read_plan

    if DEFAULT_DISTILLATION not in distillations:
        raise ValueError(f"the {DEFAULT_DISTILLATION!r} run is needed (it is quantized)")
    reports: dict[str, Any] = {}
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="bench-combination-") as tmp:
        work = Path(tmp)
        reports_dir = out / "reports"
        for name in distillations:
            cfg = compression_config(
                proto,
                name,
                arch=arch,
                dataset=dataset,
                in_chans=in_chans,
                input_size=input_size,
                device=device,
            )
            log(f"compressing with recovery loss {name}")
            started = time.perf_counter()
            rep = compress(cfg, weights=weights, out_dir=work / name)
            log(
                f"  {name}: top-1 {rep.pruned.top1:.2f} at {rep.macs_ratio:.1%} MACs "
                f"({time.perf_counter() - started:.0f} s)"
            )
            reports[name] = rep
            files[name] = work / name / "model.onnx"
            write_json(reports_dir / f"{name}.json", rep.model_dump(mode="json"))
        default = reports[DEFAULT_DISTILLATION]
        for q in default.quantized:
            files[q.mode] = work / DEFAULT_DISTILLATION / get_quantizer(q.mode).file
        num_classes = read_plan(work / DEFAULT_DISTILLATION / "plan.json").num_classes
        base = build_model(arch, num_classes, in_chans=in_chans, input_size=input_size)
        load_weights(base, weights)
        files = {"base": work / "base.onnx", **files}
        export_onnx(base.eval(), torch.zeros(2, in_chans, input_size, input_size), files["base"])
        sizes = {name: path.stat().st_size for name, path in files.items()}
        labels, latency = time_all(files, (in_chans, input_size, input_size), proto, device)
        rows = build_rows(reports, sizes, latency)
        shutil.rmtree(work, ignore_errors=True)
    return rows, labels, reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(NAME, "Pruning x distillation x quantization: the paper's table.")
    add_base_model_args(parser)
    g = parser.add_argument_group("protocol (defaults: the mode's)")
    g.add_argument("--target", type=float, help="MACs fraction to keep")
    g.add_argument("--steps", type=int)
    g.add_argument("--iters-per-step", type=int)
    g.add_argument("--trunc-iters", type=int)
    g.add_argument("--final-iters", type=int)
    g.add_argument("--max-layers", type=int)
    g.add_argument("--max-eval-samples", type=int)
    g.add_argument("--runs", type=int, help="timed runs per file and batch size")
    g.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    g.add_argument("--feature-taps", help="comma-separated module paths for kd_features")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {
        "target": args.target,
        "steps": args.steps,
        "iters_per_step": args.iters_per_step,
        "trunc_iters": args.trunc_iters,
        "final_iters": args.final_iters,
        "max_layers": args.max_layers,
        "max_eval_samples": args.max_eval_samples,
        "runs": args.runs,
        "threads": args.threads,
    }
    if args.feature_taps:
        overrides["feature_taps"] = tuple(t.strip() for t in args.feature_taps.split(","))
    proto = choose_protocol(args.mode, QUICK, FULL, **overrides)
    started = time.perf_counter()
    tcfg = train_config(
        args.arch, args.dataset, args.in_chans, args.input_size, args.base_epochs, args.device
    )
    base = ensure_base_model(tcfg, base_weights=args.base_weights)
    log(f"base model: {base.source}")
    out: Path = args.out
    rows, labels, reports = run(
        proto,
        arch=args.arch,
        dataset=args.dataset,
        in_chans=args.in_chans,
        input_size=args.input_size,
        device=args.device,
        weights=base.weights,
        out=out,
    )
    test_images = reports[DEFAULT_DISTILLATION].splits.get("test", 0)
    payload = {
        "benchmark": NAME,
        "mode": args.mode,
        "command": command_line(),
        "protocol": asdict(proto),
        "base": {"source": base.source, "key": base.key, "train": base.train_info},
        "rows": rows,
        "test_images": test_images,
        "devices": labels,
        "machine": machine(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(out / "results.json", payload)
    write_text(out / "RESULTS.md", markdown(payload))
    plot(payload, out / "combination.png")
    log(f"wrote {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
