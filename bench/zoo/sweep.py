"""The zoo sweep: every timm and torchvision classifier, each in its own subprocess.

    python -m bench.zoo [--quick] [--filter GLOB] [--every K] [--limit N] [--jobs J] [--timeout S]
                        [--sources timm,torchvision] [--no-tp] [--out DIR]

Each model runs ``bench.zoo.steps.run_model`` in a fresh ``python -m bench.zoo --one
source:name`` child with a wall-clock limit (``--timeout``), so a hang or a crash costs that
model only (recorded as ``timeout`` or ``crash``). ``--quick`` runs the fixed CI sample
(``SAMPLE``). Torch-Pruning's own sweep (one ``MetaPruner`` step at 50 %,
``steps.torch_pruning_step``) runs on the torchvision models of the selection, in the same
child, unless ``--no-tp``.

Results: ``results.json`` (one row per model, rewritten after every model so an interrupted
sweep keeps what finished) and ``RESULTS.md`` (coverage, failures grouped by reason, the
side-by-side with Torch-Pruning) in ``--out`` (default ``bench/results/zoo``). Coverage is
the share of the models that build and export unpruned which pass every step.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import write_json, write_text

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "results" / "zoo"

# The CI sample (tests/bench/test_zoo_sample.py): the smallest variant of each family the
# issue names, all of which must pass every step.
SAMPLE: tuple[str, ...] = (
    "timm:tf_efficientnet_lite0",  # EfficientNet-Lite (the reported model)
    "timm:regnetx_002",  # RegNet
    "timm:seresnet18",  # SE-ResNet
    "timm:resnext26ts",  # ResNeXt
    "timm:mobilenetv3_small_050",  # MobileNetV3
    "torchvision:mobilenet_v2",  # MobileNetV2
    "timm:ghostnet_050",  # GhostNet
    "timm:convnext_atto",  # ConvNeXt
    "timm:deit_tiny_patch16_224",  # DeiT / ViT
    "timm:swin_tiny_patch4_window7_224",  # Swin
    "timm:coatnet_pico_rw_224",  # CoAtNet
    "timm:mobilevit_xxs",  # MobileViT
    "timm:efficientformer_l1",  # EfficientFormer
    "torchvision:densenet121",  # DenseNet
    "timm:dla46_c",  # DLA
    "torchvision:inception_v3",  # Inception
    "torchvision:mnasnet0_5",  # torchvision classifier not in the paper
    "torchvision:regnet_y_400mf",  # torchvision RegNet
    "torchvision:squeezenet1_1",  # torchvision classifier not in the paper (concat)
    "torchvision:shufflenet_v2_x0_5",  # channel shuffle
    "timm:eva02_tiny_patch14_224",  # EVA-02: fused SwiGLU (GluMlp), RoPE attention
    "timm:coat_tiny",  # CoaT: class-token concats, factorised conv-attention, parallel blocks
)


def all_models(sources: list[str]) -> list[str]:
    names: list[str] = []
    if "torchvision" in sources:
        import torchvision

        names += [
            f"torchvision:{n}"
            for n in sorted(torchvision.models.list_models(module=torchvision.models))
        ]
    if "timm" in sources:
        import timm

        names += [f"timm:{n}" for n in timm.list_models()]
    return names


def run_child(ref: str, timeout: float, tp: bool) -> dict[str, Any]:
    source, _, name = ref.partition(":")
    cmd = [sys.executable, "-m", "bench.zoo", "--one", ref] + ([] if tp else ["--no-tp"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        steps = [ln.split()[1] for ln in out.splitlines() if ln.startswith("#step ")]
        step = steps[-1] if steps else "build"
        # A model that does not even build and export unpruned in time is skipped, not failed.
        return {
            "source": source,
            "model": name,
            "status": "skip" if step in ("build", "export_unpruned") else "fail",
            "failed_step": step,
            "reason": f"timeout: no result within {timeout:g} s",
            "s": round(time.perf_counter() - start, 1),
        }
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        return {
            "source": source,
            "model": name,
            "status": "fail",
            "failed_step": "crash",
            "reason": f"crash: exit {proc.returncode}: {tail[0][:200]}",
            "s": round(time.perf_counter() - start, 1),
        }
    row = json.loads(lines[-1])
    row["s"] = round(time.perf_counter() - start, 1)
    return row


def one(ref: str, tp: bool) -> dict[str, Any]:
    """Run one model in this process (the child side); prints its row as one JSON line."""
    import torch

    from bench.zoo.steps import run_model, torch_pruning_step

    torch.set_num_threads(1)  # one core per model; --jobs runs several side by side
    source, _, name = ref.partition(":")
    row = run_model(source, name)
    if tp and source == "torchvision" and row["status"] != "skip":
        row["torch_pruning"] = torch_pruning_step(source, name, row["size"])
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    eligible = [r for r in rows if r["status"] != "skip"]
    passed = [r for r in eligible if r["status"] == "pass"]
    tv = [r for r in eligible if r["source"] == "torchvision"]
    tp_rows = [r["torch_pruning"] for r in tv if "torch_pruning" in r]
    timeouts = [r for r in eligible if str(r.get("reason", "")).startswith("timeout")]
    judged = len(eligible) - len(timeouts)
    return {
        "models": len(rows),
        "timeouts": len(timeouts),
        # Timeouts say the machine was slow, not what fails: the figure without them too.
        "coverage_without_timeouts": len(passed) / judged if judged else None,
        "skipped": len(rows) - len(eligible),
        "eligible": len(eligible),
        "passed": len(passed),
        "coverage": len(passed) / len(eligible) if eligible else None,
        "torchvision_eligible": len(tv),
        "torchvision_passed": sum(r["status"] == "pass" for r in tv),
        "torch_pruning_ran": len(tp_rows),
        "torch_pruning_passed": sum(r["status"] == "pass" for r in tp_rows),
        "by_reason": dict(
            Counter(
                f"{r.get('failed_step')}: {_short(r.get('reason', ''))}"
                for r in rows
                if r["status"] != "pass"
            ).most_common()
        ),
    }


def _short(reason: str) -> str:
    # Group reasons by their stable part: the code/exception and the first clause.
    return reason.split(" (")[0][:140]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = summarise(rows)
    cov = f"{s['coverage']:.1%}" if s["coverage"] is not None else "n/a"
    out = [
        "# Zoo: timm and torchvision classifiers through every step",
        "",
        f"Selection: {meta['selection']}; {meta['host']}, {meta['wall_s']:.0f} s wall, "
        f"{meta['jobs']} job(s), {meta['timeout']:g} s per model.",
        "Steps per model (library code, random init, 10 classes, RGB, smallest of "
        "32/64/96/128/160/224 px that builds): build → TorchScript+ONNX export of the unpruned "
        "model → one stage-1 cut to 50 % MACs + one recovery iteration → one stage-2 attempt "
        "→ TorchScript+ONNX export with parity → plan replay.",
        "",
        f"**Coverage: {s['passed']} / {s['eligible']} = {cov}** of the architectures that "
        f"build and export unpruned pass every step ({s['skipped']} skipped: do not build or "
        "do not export unpruned, or are over 100 M parameters).",
        "",
    ]
    if s["timeouts"]:
        cwt = s["coverage_without_timeouts"]
        out += [
            f"{s['timeouts']} of the failures are timeouts after the unpruned export (the "
            f"{meta['timeout']:g} s limit on a shared, loaded machine); without them: "
            f"{s['passed']} / {s['eligible'] - s['timeouts']} = "
            f"{f'{cwt:.1%}' if cwt is not None else 'n/a'}.",
            "",
        ]
    if s["torchvision_eligible"]:
        out += [
            "## Side by side with Torch-Pruning (torchvision models of the selection)",
            "",
            "| | models | pass |",
            "|---|---:|---:|",
            f"| flow-compress, every step (incl. export, depth, replay) | "
            f"{s['torchvision_eligible']} | {s['torchvision_passed']} |",
            f"| Torch-Pruning MetaPruner, one 50 % step, output shape kept | "
            f"{s['torch_pruning_ran']} | {s['torch_pruning_passed']} |",
            "",
        ]
    out += [
        "## Not passing, grouped by reason",
        "",
        "| count | step: reason | models |",
        "|---:|---|---|",
    ]
    groups: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["status"] != "pass":
            key = f"{r['status']} at {r.get('failed_step')}: {_short(r.get('reason', ''))}"
            groups[key].append(f"{r['source']}:{r['model']}")
    for key, models in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(f"`{m}`" for m in models[:12]) + (" …" if len(models) > 12 else "")
        out.append(f"| {len(models)} | {key.replace('|', '/')} | {shown} |")
    out += [
        "",
        "## Every model",
        "",
        "| model | px | status | stage-1 MACs | candidates | truncated | TP | s |",
        "|---|---:|---|---:|---:|---|---|---:|",
    ]
    for r in rows:
        tp = r.get("torch_pruning", {}).get("status", "")
        ratio = r.get("stage1_macs_ratio")
        out.append(
            f"| {r['source']}:{r['model']} | {r.get('size', '')} | {r['status']}"
            f"{' (' + str(r.get('failed_step')) + ')' if r['status'] != 'pass' else ''} | "
            f"{f'{ratio:.0%}' if ratio is not None else ''} | {r.get('candidates', '')} | "
            f"{r.get('truncated', '')} | {tp} | {r.get('s', '')} |"
        )
    return "\n".join(out) + "\n"


def merge(folders: list[Path], out: Path) -> int:
    """One report of several sweeps' rows (a model in several keeps its first row)."""
    rows: dict[str, dict[str, Any]] = {}
    parts, wall = [], 0.0
    meta: dict[str, Any] = {}
    for folder in folders:
        data = json.loads((folder / "results.json").read_text())
        meta = data["meta"]
        parts.append(f"{meta['selection']} ({len(data['rows'])} models)")
        wall += float(meta["wall_s"])
        for r in data["rows"]:
            rows.setdefault(f"{r['source']}:{r['model']}", r)
    meta = {**meta, "selection": "; ".join(parts), "wall_s": wall}
    write_report(out, list(rows.values()), meta)
    return 0


def write_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """``results.json`` and ``RESULTS.md`` of ``rows``, each written atomically (the sweep
    rewrites them after every model, and a reader may look at any time)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"meta": meta, "summary": summarise(rows), "rows": rows})
    write_text(out / "RESULTS.md", markdown(rows, meta))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.zoo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="the fixed CI sample only")
    p.add_argument("--filter", default=None, help="glob on source:name, e.g. 'timm:resnet*'")
    p.add_argument("--limit", type=int, default=None, help="first N models of the selection")
    p.add_argument("--offset", type=int, default=0, help="skip the first N of the selection")
    p.add_argument("--every", type=int, default=1, help="every K-th model (a spread sample)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    p.add_argument("--sources", default="timm,torchvision")
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning's sweep")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument(
        "--merge",
        default=None,
        help="comma-separated result folders: write one report of their rows (first wins) to --out",
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, not args.no_tp)), flush=True)
        return 0
    if args.merge:
        return merge([Path(d) for d in args.merge.split(",")], args.out)
    refs = list(SAMPLE) if args.quick else all_models(args.sources.split(","))
    if args.filter:
        refs = [r for r in refs if fnmatch.fnmatch(r, args.filter)]
    refs = refs[args.offset :: max(1, args.every)]
    if args.limit is not None:
        refs = refs[: args.limit]
    args.out.mkdir(parents=True, exist_ok=True)
    selection = "CI sample" if args.quick else f"{args.sources}"
    if args.filter:
        selection += f", filter {args.filter!r}"
    if args.every > 1:
        selection += f", every {args.every}th model"
    if args.offset or args.limit is not None:
        selection += f", from #{args.offset}, {len(refs)} models"
    meta: dict[str, Any] = {
        "selection": selection,
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "jobs": args.jobs,
        "timeout": args.timeout,
        "wall_s": 0.0,
    }
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()

    def write() -> None:
        meta["wall_s"] = time.perf_counter() - start
        ordered = sorted(rows, key=lambda r: refs.index(f"{r['source']}:{r['model']}"))
        write_report(args.out, ordered, meta)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(lambda r: run_child(r, args.timeout, not args.no_tp), refs):
            rows.append(row)
            print(
                f"{row['source']}:{row['model']}: {row['status']} "
                f"{row.get('failed_step', '')} {row.get('reason', '')[:120]}",
                flush=True,
            )
            write()
    write()
    s = summarise(rows)
    print(f"coverage {s['passed']}/{s['eligible']} (skipped {s['skipped']})")
    return 0
