"""What every benchmark shares: modes and output folders, the machine description, result
files (JSON + Markdown), the cached base model, and small statistics and table helpers.

Only the library's public API is used (``train``, ``compress``, ``environment``), so the
benchmarks measure what users run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO / "bench" / "results"
CACHE_ROOT = RESULTS_ROOT / "cache"
RUNS_ROOT = REPO / "runs"

# The base model every benchmark starts from by default: resnet18 trained on real
# Fashion-MNIST at 28 px, grey input, 2 epochs (the recipe of the lead's runs/ model, so the
# cache key matches and that model is reused rather than retrained).
DEFAULT_ARCH = "resnet18"
DEFAULT_DATASET = "fashion-mnist"
DEFAULT_IN_CHANS = 1
DEFAULT_INPUT_SIZE = 28
DEFAULT_EPOCHS = 2.0


P = TypeVar("P")


def choose_protocol(mode: str, quick: P, full: P, **overrides: Any) -> P:
    """The ``mode``'s protocol (a frozen dataclass) with every override that is not None."""
    base = quick if mode == "quick" else full
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[type-var]


def schedule_config(
    proto: Any,
    *,
    arch: str,
    dataset: str,
    in_chans: int,
    input_size: int,
    device: str,
    max_drop: float = 100.0,
) -> dict[str, Any]:
    """The ``CompressionConfig`` fields the one-model benchmarks share, from a protocol with
    ``target``, ``steps``, ``max_layers``, ``iters_per_step``, ``trunc_iters``,
    ``final_iters`` and ``batch_size``; callers add their own sections. The accuracy budget
    is lifted by default so that a run reaches the asked-for MACs."""
    return {
        "model": arch,
        "dataset": dataset,
        "in_chans": in_chans,
        "input_size": input_size,
        "target_macs": proto.target,
        "max_drop": max_drop,
        "device": device,
        "prune": {"steps": proto.steps},
        "truncate": {"max_layers": proto.max_layers},
        "recovery": {
            "iters_per_step": proto.iters_per_step,
            "trunc_iters": proto.trunc_iters,
            "final_iters": proto.final_iters,
            "batch_size": proto.batch_size,
        },
    }


def log(message: str) -> None:
    """Progress to stderr with a wall-clock stamp (stdout stays free for tools)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- arguments


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: ``--quick`` (default) or
    ``--full``, and ``--out`` (default ``bench/results/<name>``)."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="small settings, minutes on 2 CPU cores (the default)",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="the full protocol (hours on a CPU; meant for a GPU)",
    )
    parser.set_defaults(mode="quick")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_ROOT / name,
        help=f"folder for results.json, RESULTS.md and plots (default bench/results/{name})",
    )
    return parser


def add_base_model_args(parser: argparse.ArgumentParser) -> None:
    """Options naming the base model (architecture, data, training recipe or given weights)."""
    g = parser.add_argument_group("base model")
    g.add_argument("--arch", default=DEFAULT_ARCH, help="registered architecture name")
    g.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="dataset reference (fashion-mnist[:ROOT], digits, cifar10[:ROOT], ...)",
    )
    g.add_argument("--in-chans", type=int, default=DEFAULT_IN_CHANS)
    g.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE)
    g.add_argument(
        "--base-epochs",
        type=float,
        default=DEFAULT_EPOCHS,
        help="epochs of the cached base model's training (part of its cache key)",
    )
    g.add_argument(
        "--base-weights",
        type=Path,
        default=None,
        help="use these weights (safetensors or weights-only state dict) instead of the cache",
    )
    g.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N] for compression"
    )


def parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def command_line() -> str:
    """The command as a user would type it (module form, arguments quoted)."""
    module = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "bench"
    if module == "__main__" or not module:
        module = "bench"
    args = shlex.join(sys.argv[1:])
    return f"python -m bench.{module} {args}".rstrip()


# --------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """The hardware and software the numbers come from, with the load at the time: on a
    shared machine the load average says how much the timings can be trusted."""
    from flow_compress.measure.environment import environment

    env: dict[str, Any] = dict(environment())
    env["cpu_count"] = os.cpu_count() or 1
    try:
        env["loadavg_1m_5m_15m"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        env["loadavg_1m_5m_15m"] = None
    import torch

    env["torch_threads"] = torch.get_num_threads()
    return env


def machine_lines(env: dict[str, Any]) -> list[str]:
    """Markdown bullet lines describing ``env`` (from ``machine``)."""
    lines = [
        f"- CPU: {env.get('cpu', '?')} ({env.get('cores', '?')} cores; torch threads "
        f"{env.get('torch_threads', '?')})",
        f"- torch {env.get('torch', '?')}, torchvision {env.get('torchvision', '?')}, "
        f"torch-pruning {env.get('torch_pruning', '?')}, onnxruntime {env.get('onnxruntime', '?')}"
        f", Python {env.get('python', '?')}",
        f"- platform: {env.get('platform', '?')}",
    ]
    if env.get("cuda_devices"):
        lines.append(f"- GPU: {env['cuda_devices']} (CUDA {env.get('torch_cuda', '?')})")
    else:
        lines.append("- GPU: none")
    if env.get("loadavg_1m_5m_15m"):
        lines.append(f"- load average at the end (1/5/15 min): {env['loadavg_1m_5m_15m']}")
    return lines


# --------------------------------------------------------------------------- files


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write text atomically (the library's ``atomic_write_text``)."""
    from flow_compress.artifacts import atomic_write_text

    atomic_write_text(path, text)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table (the library's ``md_table``); the first column is
    left-aligned, the others right-aligned."""
    from flow_compress.report.markdown import md_table as table

    align = "l" + "r" * (len(headers) - 1)
    return "\n".join(table(headers, [list(r) for r in rows], align))


def figure(width: float = 7.0, height: float = 4.5) -> tuple[Any, Any]:
    """A matplotlib Figure and its Axes, without pyplot (no global state, no display)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


# --------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    if not values:
        return math.nan, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt_mean_std(values: Sequence[float], digits: int = 2) -> str:
    mean, std = mean_std(values)
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), ``numpy.percentile``'s linear interpolation; NaN for no
    values."""
    import numpy as np

    return float(np.percentile(values, q)) if values else math.nan


# --------------------------------------------------------------------------- base model


@dataclass(frozen=True)
class BaseModel:
    """A base model's weights and where they came from.

    ``train_info`` is the ``train.json`` written by the library's ``train`` (config, val and
    test top-1 on the full splits, time), or None for weights given without one.
    """

    weights: Path
    source: str
    key: str | None
    train_info: dict[str, Any] | None


def train_config(
    arch: str = DEFAULT_ARCH,
    dataset: str = DEFAULT_DATASET,
    in_chans: int = DEFAULT_IN_CHANS,
    input_size: int = DEFAULT_INPUT_SIZE,
    epochs: float = DEFAULT_EPOCHS,
    device: str = "auto",
) -> Any:
    """The ``TrainConfig`` of a benchmark base model (``flow-compress train`` with these
    options and every other option at its default)."""
    from flow_compress.config import TrainConfig

    return TrainConfig(
        model=arch,
        dataset=dataset,
        in_chans=in_chans,
        input_size=input_size,
        epochs=epochs,
        device=device,
    )


def _recipe(cfg: Any) -> dict[str, Any]:
    # The device is where a model is trained, not what it is: a base model trained on a GPU
    # serves a CPU benchmark, so it is left out of the cache key.
    recipe: dict[str, Any] = cfg.model_dump(mode="json", exclude={"device"})
    return recipe


def cache_key(cfg: Any) -> str:
    """``<arch>-<dataset>-<hash>``: the hash covers the whole TrainConfig except the device."""
    blob = json.dumps(_recipe(cfg), sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:12]
    dataset = "".join(c if c.isalnum() or c in "-_" else "_" for c in cfg.dataset)
    return f"{cfg.model}-{dataset}-{digest}"


def _same_recipe(info: dict[str, Any], cfg: Any) -> bool:
    from pydantic import ValidationError

    from flow_compress.config import TrainConfig

    try:
        other = TrainConfig.model_validate(info["config"])
    except (KeyError, TypeError, ValidationError):
        return False
    return _recipe(other) == _recipe(cfg)


def ensure_base_model(
    cfg: Any,
    *,
    base_weights: Path | None = None,
    cache_root: Path = CACHE_ROOT,
    search_root: Path | None = RUNS_ROOT,
) -> BaseModel:
    """Weights of the base model trained with ``cfg`` (a ``TrainConfig``).

    Order: ``base_weights`` when given (used as they are; a ``train.json`` beside them is
    read if present); else ``cache_root/<key>/weights.safetensors``; else a model trained
    earlier with the identical recipe under ``search_root/*/`` (its ``train.json`` config
    equal to ``cfg`` except the device) is copied into the cache; else ``cfg`` is trained now
    with the library's ``train`` (as ``flow-compress train`` does) and cached. The cache entry
    appears atomically, complete or not at all.
    """
    if base_weights is not None:
        if not base_weights.is_file():
            raise FileNotFoundError(f"--base-weights {base_weights} does not exist")
        info_path = base_weights.with_name("train.json")
        info = json.loads(info_path.read_text()) if info_path.is_file() else None
        return BaseModel(base_weights, f"given: {base_weights}", None, info)

    key = cache_key(cfg)
    entry = cache_root / key
    weights = entry / "weights.safetensors"
    info_path = entry / "train.json"
    if weights.is_file() and info_path.is_file():
        return BaseModel(weights, f"cache: {_rel(entry)}", key, json.loads(info_path.read_text()))

    cache_root.mkdir(parents=True, exist_ok=True)
    scratch = cache_root / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    source = ""
    if search_root is not None and search_root.is_dir():
        for candidate in sorted(search_root.glob("*/train.json")):
            try:
                info = json.loads(candidate.read_text())
            except (OSError, ValueError):
                continue
            if _same_recipe(info, cfg) and (candidate.parent / "weights.safetensors").is_file():
                scratch.mkdir(parents=True)
                shutil.copy2(candidate.parent / "weights.safetensors", scratch)
                shutil.copy2(candidate, scratch / "train.json")
                source = f"cache: {_rel(entry)} (copied from {_rel(candidate.parent)})"
                log(f"base model: reusing {_rel(candidate.parent)} (same training recipe)")
                break
    if not source:
        from flow_compress.train import train

        log(f"base model: training {cfg.model} on {cfg.dataset} for {cfg.epochs} epochs")
        total = 0

        def on_iter(i: int, n: int, loss: float) -> None:
            nonlocal total
            total = n
            if i % 50 == 0 or i + 1 == n:
                log(f"  train {i + 1}/{n} loss {loss:.3f}")

        train(cfg, scratch, on_iter=on_iter)
        source = f"cache: {_rel(entry)} (trained by this benchmark, {total} iterations)"
    if entry.exists():
        shutil.rmtree(entry)
    os.replace(scratch, entry)
    return BaseModel(weights, source, key, json.loads(info_path.read_text()))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


__all__ = [
    "CACHE_ROOT",
    "REPO",
    "RESULTS_ROOT",
    "BaseModel",
    "add_base_model_args",
    "cache_key",
    "choose_protocol",
    "command_line",
    "ensure_base_model",
    "figure",
    "fmt_mean_std",
    "log",
    "machine",
    "machine_lines",
    "make_parser",
    "md_table",
    "mean_std",
    "parse_floats",
    "parse_ints",
    "percentile",
    "schedule_config",
    "train_config",
    "write_json",
    "write_text",
]
