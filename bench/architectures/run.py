"""The paper's eight architectures at 224 px: base against pruned, one compress run each.

    python -m bench.architectures.run [--models resnet50,vgg19_bn,...] [--out DIR] [options]

The test suite builds each of them and prunes it one step at 64 px only
(``tests/flow_compress/test_architectures.py``); this is where they run at 224 px.

For every paper variant (ResNet-50, EfficientNet-B4, ViT-B/16, MobileNetV3-L, DenseNet-121,
ConvNeXt-S, VGG19-BN, ShuffleNetV2 x2.0; torchvision builds, 10 classes, RGB input):

1. build the model from a fixed seed and, with ``--train-epochs`` > 0, train it briefly on
   the dataset (Fashion-MNIST at 224 px by default, grey replicated to RGB); its weights are
   the base model;
2. run the library's ``compress`` once at the MACs target (default 35 %) with a short
   schedule on a subset of the data (``--train-samples`` / ``--eval-samples``): stage 1,
   stage 2, final fine-tune, TorchScript + ONNX export with parity, plan replay;
3. time base and pruned with ONNX Runtime on the CPU, batch 1 (the library's
   ``compare_latency``: warm-up, then the median of ``--runs`` runs, base and pruned
   interleaved), on every machine whatever device compressed.

GMACs are multiply-accumulates as torch-pruning counts them (FLOPs = 2 × MACs). Results are
written after every model to ``results.json`` and ``RESULTS.md`` in ``--out`` (default
``bench/architectures``), so an interrupted run keeps what finished; a model that fails is
recorded with its error code and message. With a short schedule on a randomly initialised or
briefly trained base, accuracies say nothing about the method; the table is about cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flow_compress.arch.models import build_model, save_weights
from flow_compress.config import CompressionConfig, LatencyConfig, TrainConfig
from flow_compress.errors import FlowCompressError
from flow_compress.measure.environment import environment
from flow_compress.measure.latency import compare_latency
from flow_compress.pipeline import compress
from flow_compress.plan import read_plan, rebuild
from flow_compress.train import train

PAPER = {
    "resnet50": "ResNet-50",
    "efficientnet_b4": "EfficientNet-B4",
    "vit_b_16": "ViT-B/16",
    "mobilenet_v3_large": "MobileNetV3-L",
    "densenet121": "DenseNet-121",
    "convnext_small": "ConvNeXt-S",
    "vgg19_bn": "VGG19-BN",
    "shufflenet_v2_x2_0": "ShuffleNetV2 x2.0",
}
SIZE = 224
HERE = Path(__file__).resolve().parent


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.architectures.run", description=__doc__)
    p.add_argument("--models", default=",".join(PAPER), help="comma-separated registry names")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--dataset", default="fashion-mnist", help="dataset reference")
    p.add_argument("--target-macs", type=float, default=0.35)
    p.add_argument("--device", default="auto", help="device that compresses (auto, cpu, cuda)")
    p.add_argument("--train-epochs", type=float, default=0.0, help="base training, epochs")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="stage-1 steps")
    p.add_argument("--iters", type=int, default=10, help="recovery iterations per step")
    p.add_argument("--final-iters", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-layers", type=int, default=1, help="stage-2 removals at most")
    p.add_argument("--runs", type=int, default=20, help="timed latency runs")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for timing")
    return p.parse_args(argv)


def _config(args: argparse.Namespace, name: str) -> CompressionConfig:
    return CompressionConfig.model_validate(
        {
            "model": name,
            "dataset": args.dataset,
            "in_chans": 3,
            "input_size": SIZE,
            "target_macs": args.target_macs,
            # A short schedule cannot hold a real accuracy budget; the run is about cost.
            "max_drop": 100.0,
            "device": args.device,
            "prune": {"steps": args.steps, "calibration_batches": 2},
            "truncate": {
                "max_layers": args.max_layers,
                "n_try": 1,
                "tau": 100.0,
                "calibration_batches": 2,
            },
            "recovery": {
                "iters_per_step": args.iters,
                "trunc_iters": max(1, args.iters // 2),
                "final_iters": args.final_iters,
                "batch_size": args.batch_size,
            },
            "data": {
                "max_train_samples": args.train_samples,
                "max_eval_samples": args.eval_samples,
                "eval_batch_size": 32,
            },
            "export": {"parity_samples": 8},
            "latency": {"enabled": False},
        }
    )


def _base_weights(args: argparse.Namespace, name: str, folder: Path) -> tuple[Path, str]:
    """Weights of the base model: seeded random init, or a brief training run."""
    path = folder / "base.safetensors"
    if args.train_epochs <= 0:
        torch.manual_seed(0)
        save_weights(build_model(name, 10, in_chans=3, input_size=SIZE), path)
        return path, "random init"
    cfg = TrainConfig.model_validate(
        {
            "model": name,
            "dataset": args.dataset,
            "in_chans": 3,
            "input_size": SIZE,
            "epochs": args.train_epochs,
            "lr": 0.01,
            "batch_size": 64,
            "device": args.device,
            "data": {"max_train_samples": None, "max_eval_samples": args.eval_samples},
        }
    )
    result = train(cfg, folder / "base")
    shutil.copy(folder / "base" / "weights.safetensors", path)
    return path, f"trained {result.iterations} iterations (val top-1 {result.val_top1:.1f} %)"


def _latency(base_weights: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    plan = read_plan(run_dir / "plan.json")
    pruned = rebuild(plan, run_dir / "weights.safetensors")
    base = rebuild(plan.model_copy(update={"ops": []}), base_weights)
    cfg = LatencyConfig(
        batch_sizes=(1,),
        runtimes=("onnxruntime",),
        warmup=args.warmup,
        runs=args.runs,
        threads=args.threads,
    )
    with tempfile.TemporaryDirectory() as work:
        (rec,) = compare_latency(
            base, pruned, (3, SIZE, SIZE), cfg, torch.device("cpu"), Path(work)
        )
    return {
        "device": rec.device,
        "base_ms": rec.base_ms,
        "pruned_ms": rec.pruned_ms,
        "speedup": rec.speedup,
    }


def run_one(args: argparse.Namespace, name: str) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "paper_name": PAPER.get(name, name)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        try:
            weights, origin = _base_weights(args, name, folder)
            row["base_weights"] = origin
            report = compress(_config(args, name), weights=weights, out_dir=folder / "run")
            row.update(
                base_gmacs=report.base.macs / 1e9,
                pruned_gmacs=report.pruned.macs / 1e9,
                base_mparams=report.base.params / 1e6,
                pruned_mparams=report.pruned.params / 1e6,
                macs_ratio=report.macs_ratio,
                base_top1=report.base.top1,
                pruned_top1=report.pruned.top1,
                parity={p.format: p.max_abs_diff for p in report.parity},
                stages=[f"{s.stage}: {s.macs / 1e9:.2f} GMACs" for s in report.steps],
                removed=[s.detail for s in report.steps if s.stage == "Layer Trunc"],
                device=report.environment.get("device_used"),
            )
            row["latency"] = _latency(weights, folder / "run", args)
            row["status"] = "ok"
        except FlowCompressError as exc:
            row.update(status=exc.code, error=exc.message)
        except Exception as exc:  # the benchmark records any failure and goes on
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# The paper's eight architectures at 224 px",
        "",
        f"One `compress` run per model at a {meta['target_macs']:.0%} MACs target on "
        f"`{meta['dataset']}` (subset: {meta['train_samples']} training / "
        f"{meta['eval_samples']} evaluation images, {meta['steps']} stage-1 steps, "
        f"{meta['iters']} recovery iterations per step, {meta['final_iters']} fine-tune "
        "iterations, at most "
        f"{meta['max_layers']} stage-2 removal), compressed on {meta['device']}. Latency: ONNX "
        f"Runtime on the CPU ({meta['cpu']}), batch 1, float32, median of {meta['runs']} runs "
        "after warm-up, base and pruned interleaved. GMACs are multiply-accumulates "
        "(FLOPs = 2 × MACs). Base weights: "
        f"{meta['base_weights']}; accuracies after so short a schedule say nothing about the "
        "method and are left out.",
        "",
        "| model | base GMACs | pruned GMACs | MACs kept | base params (M) | pruned params (M) "
        "| base ms | pruned ms | speed-up | stage-2 removal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(
                f"| {r['paper_name']} (`{r['model']}`) | — | — | — | — | — | — | — | — | "
                f"did not run: {r.get('status')}: {str(r.get('error', ''))[:160]} |"
            )
            continue
        lat = r["latency"]
        removed = "; ".join(r["removed"]) or "none"
        lines.append(
            f"| {r['paper_name']} (`{r['model']}`) | {r['base_gmacs']:.2f} | "
            f"{r['pruned_gmacs']:.2f} | {r['macs_ratio']:.1%} | {r['base_mparams']:.1f} | "
            f"{r['pruned_mparams']:.1f} | {lat['base_ms']:.1f} | {lat['pruned_ms']:.1f} | "
            f"{lat['speedup']:.2f}× | {removed} |"
        )
    missing = [PAPER.get(m, m) for m in meta["models"] if m not in {r["model"] for r in rows}]
    if missing:
        lines += ["", f"Not run (time ran out before them): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    torch.manual_seed(0)
    env = environment()
    meta: dict[str, Any] = {
        "models": models,
        "dataset": args.dataset,
        "target_macs": args.target_macs,
        "train_samples": args.train_samples,
        "eval_samples": args.eval_samples,
        "steps": args.steps,
        "iters": args.iters,
        "final_iters": args.final_iters,
        "max_layers": args.max_layers,
        "runs": args.runs,
        "device": env.get("device", "auto") if args.device == "auto" else args.device,
        "cpu": f"{env.get('cpu') or platform.machine()}, "
        f"{args.threads or torch.get_num_threads()} threads",
        "base_weights": "seeded random init"
        if args.train_epochs <= 0
        else f"trained {args.train_epochs} epochs",
        "environment": env,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in models:
        log(f"{name}: compressing")
        row = run_one(args, name)
        rows.append(row)
        log(f"{name}: {row['status']} in {row['seconds']} s")
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (args.out / "RESULTS.md").write_text(markdown(rows, meta))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
