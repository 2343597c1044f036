"""Latency of the base and the pruned model, timed side by side.

Timing rules (docs/algorithm.md, "Reporting"): warm-up first, then the median of many
timed runs, with ``torch.cuda.synchronize()`` before and after each timed run on CUDA; every
record names the device, dtype and runtime. The base model is always re-timed in the same
process as the pruned one, and the two are interleaved run by run, so drift in clock speed,
thermal state or background load hits both equally and cancels in the ratio.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flow_compress.config import LatencyConfig
from flow_compress.export import EAGER_RUNTIME, exporter_for_runtime
from flow_compress.export.onnx import file_engine
from flow_compress.measure.environment import describe_device
from flow_compress.schema import LatencyRecord

DTYPE = "float32"

Runner = Callable[[], object]

# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(run: Runner, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return (time.perf_counter() - start) * 1000.0


def measure_latency(run: Runner, device: torch.device, *, warmup: int, runs: int) -> float:
    """Median wall time of ``run()`` in milliseconds.

    ``warmup`` untimed calls first (allocator, cuDNN autotuning, TorchScript's profiling
    executor and ONNX Runtime's first-run setup all happen there), then ``runs`` timed calls,
    each bracketed by ``torch.cuda.synchronize`` when ``device`` is CUDA. ``run`` is a runner
    from ``Engine.runner``: one forward pass of one model on one fixed batch.
    """
    if runs < 1:
        raise ValueError("runs must be at least 1")
    device = torch.device(device)
    for _ in range(warmup):
        run()
    return statistics.median(_time_once(run, device) for _ in range(runs))


def _interleaved(
    base: Runner, pruned: Runner, device: torch.device, *, warmup: int, runs: int
) -> tuple[float, float]:
    """Median ms of both runners, timed alternately; the order flips every round so neither
    model always runs on caches the other just warmed."""
    for _ in range(warmup):
        base()
        pruned()
    base_ms: list[float] = []
    pruned_ms: list[float] = []
    for i in range(runs):
        if i % 2 == 0:
            base_ms.append(_time_once(base, device))
            pruned_ms.append(_time_once(pruned, device))
        else:
            pruned_ms.append(_time_once(pruned, device))
            base_ms.append(_time_once(base, device))
    return statistics.median(base_ms), statistics.median(pruned_ms)


# --------------------------------------------------------------------------- runtimes


@dataclass
class Engine:
    """One model loaded in one runtime, ready to make runners for any batch size.

    ``device_label`` is the hardware that actually runs it (ONNX Runtime falls back to the CPU
    when its CUDA provider is missing, and says so here).
    """

    runtime: str
    device: torch.device
    device_label: str
    input_shape: tuple[int, int, int]
    forward: Callable[[int], Runner]
    # Logits (float32, CPU) of a float32 CPU batch as this runtime computes them, for the
    # deployment's parity check; None where an engine cannot take real inputs.
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None

    def runner(self, batch_size: int) -> Runner:
        """A no-argument callable running one forward pass on a fixed batch of this size."""
        return self.forward(batch_size)


def random_input(
    batch_size: int, input_shape: tuple[int, int, int], device: torch.device
) -> torch.Tensor:
    """A fixed pseudo-random batch (seeded by its size, so base and pruned see the same)."""
    # Normalised images are roughly standard normal per channel; a fixed seed keeps base and
    # pruned on identical data.
    gen = torch.Generator().manual_seed(batch_size)
    return torch.randn((batch_size, *input_shape), generator=gen).to(device)


def torch_engine(
    runtime: str,
    module: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
) -> Engine:
    def forward(batch_size: int) -> Runner:
        x = random_input(batch_size, input_shape, device)

        def run() -> object:
            with torch.no_grad():
                return module(x)

        return run

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x.to(device)).float().cpu()

    return Engine(runtime, device, describe_device(device), input_shape, forward, predict)


def prepare_engine(
    runtime: str,
    model: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
    work_dir: Path,
    name: str,
    *,
    threads: int | None = None,
) -> Engine:
    """Load ``model`` (already on ``device``, in eval mode) into ``runtime``.

    ``eager`` runs the module itself; any other runtime is a format's (``Exporter.runtime``),
    whose ``engine`` writes ``work_dir/<name>.<ext>`` and loads it: ``torchscript`` traces on
    ``device`` and times the reloaded archive, ``onnxruntime`` exports from a CPU copy and runs
    with the CUDA provider when ``device`` is CUDA and the provider is installed, else with the
    CPU provider (``device_label`` says which). ``threads`` sets ONNX Runtime's intra-op
    threads. An unknown runtime raises ``InvalidConfigError`` listing the registered ones.
    """
    device = torch.device(device)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if runtime == EAGER_RUNTIME:
        return torch_engine(runtime, model, input_shape, device)
    exporter = exporter_for_runtime(runtime)
    assert exporter.engine is not None
    return exporter.engine(model, input_shape, device, work_dir, name, threads)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (None: left alone) for the block."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compare_latency(
    base: nn.Module,
    pruned: nn.Module,
    input_shape: tuple[int, int, int],
    cfg: LatencyConfig,
    device: torch.device,
    work_dir: Path,
) -> list[LatencyRecord]:
    """Time ``base`` and ``pruned`` side by side for every runtime x batch size of ``cfg``.

    Both models are copied to ``device`` in eval mode (the callers' models are not moved or
    changed); TorchScript and ONNX copies of both are written to ``work_dir``. For each
    (runtime, batch) both get ``cfg.warmup`` untimed runs, then ``cfg.runs`` timed runs each,
    alternating base and pruned; ``speedup = base_ms / pruned_ms`` of the medians. dtype is
    float32. ``cfg.threads`` sets torch's and ONNX Runtime's intra-op threads for the
    duration; torch's previous thread count is restored afterwards.

    Returns records in ``cfg.runtimes`` x ``cfg.batch_sizes`` order.
    """
    device = torch.device(device)
    work_dir = Path(work_dir)
    records: list[LatencyRecord] = []
    with torch_threads(cfg.threads):
        models = {
            "base": copy.deepcopy(base).to(device).eval(),
            "pruned": copy.deepcopy(pruned).to(device).eval(),
        }
        try:
            for runtime in dict.fromkeys(cfg.runtimes):
                engines = {
                    tag: prepare_engine(
                        runtime, m, input_shape, device, work_dir, tag, threads=cfg.threads
                    )
                    for tag, m in models.items()
                }
                for batch in cfg.batch_sizes:
                    base_ms, pruned_ms = _interleaved(
                        engines["base"].runner(batch),
                        engines["pruned"].runner(batch),
                        engines["base"].device,
                        warmup=cfg.warmup,
                        runs=cfg.runs,
                    )
                    records.append(
                        LatencyRecord(
                            runtime=runtime,
                            batch_size=batch,
                            device=engines["base"].device_label,
                            dtype=DTYPE,
                            base_ms=base_ms,
                            pruned_ms=pruned_ms,
                            speedup=base_ms / pruned_ms if pruned_ms > 0 else float("nan"),
                        )
                    )
                del engines
        finally:
            del models
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def time_onnx_files(
    paths: dict[str, Path],
    input_shape: tuple[int, int, int],
    cfg: LatencyConfig,
    device: torch.device | str = "cpu",
) -> tuple[str, dict[str, dict[int, float]]]:
    """Median ONNX Runtime latency in ms of every model file in ``paths`` (name -> .onnx).

    All files are loaded in this process and timed round-robin at each of
    ``cfg.batch_sizes``: ``cfg.warmup`` untimed runs each, then ``cfg.runs`` rounds in which
    every model runs once, the order rotating each round, so drift hits every model alike
    (the same rule as ``compare_latency``, for any number of models, whatever their
    precision). ``device`` CUDA uses ONNX Runtime's CUDA provider when it is installed and
    the CPU otherwise. Inputs are float32 (float16 models keep float32 I/O).

    Returns the device label (as in ``LatencyRecord.device``) and ``{name: {batch: ms}}``.
    """
    device = torch.device(device)
    names = list(paths)
    engines = {n: file_engine(Path(paths[n]), input_shape, device, cfg.threads) for n in names}
    label = engines[names[0]].device_label if names else describe_device(device)
    out: dict[str, dict[int, float]] = {n: {} for n in names}
    for batch in cfg.batch_sizes:
        runners = {n: engines[n].runner(batch) for n in names}
        timed: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(cfg.warmup):
            for n in names:
                runners[n]()
        for i in range(cfg.runs):
            shift = i % len(names)
            for n in names[shift:] + names[:shift]:
                timed[n].append(_time_once(runners[n], engines[n].device))
        for n in names:
            out[n][batch] = statistics.median(timed[n])
    return label, out


__all__ = [
    "DTYPE",
    "Engine",
    "Runner",
    "compare_latency",
    "measure_latency",
    "prepare_engine",
    "random_input",
    "time_onnx_files",
    "torch_engine",
    "torch_threads",
]
