"""Latency of the base and the pruned model, timed side by side, and the machine they ran on.

Timing rules (ALGORITHM.md, "Guarantee and reporting"): warm-up first, then the median of many
timed runs, with ``torch.cuda.synchronize()`` before and after each timed run on CUDA; every
record names the device, dtype and runtime. The base model is always re-timed in the same
process as the pruned one, and the two are interleaved run by run, so drift in clock speed,
thermal state or background load hits both equally and cancels in the ratio.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flow_compress.config import LatencyConfig, Runtime
from flow_compress.errors import InvalidConfigError
from flow_compress.export import INPUT_NAME, OUTPUT_NAME, export_onnx, export_torchscript
from flow_compress.schema import LatencyRecord

DTYPE = "float32"
RUNTIMES: tuple[Runtime, ...] = ("eager", "torchscript", "onnxruntime")

Runner = Callable[[], object]

# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh,
    ):
        for line in fh:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe_device(device: torch.device | str) -> str:
    """Name the hardware behind ``device``, e.g. ``cpu (AMD EPYC 7763, 8 threads)`` or
    ``cuda:0 (NVIDIA H100 80GB HBM3)``. CPU descriptions carry torch's current thread count,
    which latency on the CPU depends on."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({cpu_model()}, {threads} thread{'s' if threads != 1 else ''})"
    return str(device)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """Software and hardware the report's numbers were measured with.

    ``device`` defaults to the first CUDA device when one is available, else the CPU.
    Keys: device, torch, torchvision, torch_pruning, onnx, onnxruntime, onnxruntime_providers,
    python, platform, cpu, cores; torch_cuda (the CUDA version torch was built for) and
    cuda_devices (the GPUs visible) where they apply.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "torch_pruning": _version("torch-pruning"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": f"{_usable_cores()} usable of {os.cpu_count() or 1} logical",
    }
    with contextlib.suppress(ImportError):
        import onnxruntime as ort

        env["onnxruntime_providers"] = ", ".join(ort.get_available_providers())
    if torch.version.cuda:
        env["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        env["cuda_devices"] = ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
    return env


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

    runtime: Runtime
    device: torch.device
    device_label: str
    input_shape: tuple[int, int, int]
    forward: Callable[[int], Runner]

    def runner(self, batch_size: int) -> Runner:
        """A no-argument callable running one forward pass on a fixed batch of this size."""
        return self.forward(batch_size)


def _input(
    batch_size: int, input_shape: tuple[int, int, int], device: torch.device
) -> torch.Tensor:
    # Normalised images are roughly standard normal per channel; a fixed seed keeps base and
    # pruned on identical data.
    gen = torch.Generator().manual_seed(batch_size)
    return torch.randn((batch_size, *input_shape), generator=gen).to(device)


def _torch_engine(
    runtime: Runtime,
    module: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
) -> Engine:
    def forward(batch_size: int) -> Runner:
        x = _input(batch_size, input_shape, device)

        def run() -> object:
            with torch.no_grad():
                return module(x)

        return run

    return Engine(runtime, device, describe_device(device), input_shape, forward)


def _ort_session(path: Path, device: torch.device, threads: int | None) -> tuple[object, bool]:
    """An ONNX Runtime session on CUDA when asked and available, else on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    on_cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    if on_cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
        providers: list[object] = [("CUDAExecutionProvider", {"device_id": index})]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=options, providers=providers), on_cuda


def _onnx_engine(
    path: Path, input_shape: tuple[int, int, int], device: torch.device, threads: int | None
) -> Engine:
    import onnxruntime as ort

    session, on_cuda = _ort_session(path, device, threads)
    if on_cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()

        def forward_cuda(batch_size: int) -> Runner:
            # Input and output stay in GPU memory (I/O binding), as they do for eager CUDA
            # timings; host copies would otherwise dominate small models.
            x = ort.OrtValue.ortvalue_from_numpy(
                _input(batch_size, input_shape, torch.device("cpu")).numpy(), "cuda", index
            )
            binding = session.io_binding()  # type: ignore[attr-defined]
            binding.bind_ortvalue_input(INPUT_NAME, x)
            binding.bind_output(OUTPUT_NAME, "cuda", index)

            def run() -> object:
                session.run_with_iobinding(binding)  # type: ignore[attr-defined]
                binding.synchronize_outputs()
                return None

            return run

        return Engine("onnxruntime", device, describe_device(device), input_shape, forward_cuda)

    cpu = torch.device("cpu")
    label = describe_device(cpu)
    if device.type == "cuda":
        label += "; onnxruntime has no CUDA provider here, so this row ran on the CPU"

    def forward_cpu(batch_size: int) -> Runner:
        feed = {INPUT_NAME: _input(batch_size, input_shape, cpu).numpy().astype(np.float32)}

        def run() -> object:
            return session.run([OUTPUT_NAME], feed)  # type: ignore[attr-defined]

        return run

    return Engine("onnxruntime", cpu, label, input_shape, forward_cpu)


def prepare_engine(
    runtime: Runtime,
    model: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
    work_dir: Path,
    name: str,
    *,
    threads: int | None = None,
) -> Engine:
    """Load ``model`` (already on ``device``, in eval mode) into ``runtime``.

    ``eager`` runs the module itself. ``torchscript`` traces it on ``device`` into
    ``work_dir/<name>.ts`` and times the reloaded archive. ``onnxruntime`` exports
    ``work_dir/<name>.onnx`` from a CPU copy and runs it with the CUDA provider when ``device``
    is CUDA and the provider is installed, else with the CPU provider (``device_label`` says
    which); ``threads`` sets ONNX Runtime's intra-op threads.
    """
    device = torch.device(device)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    example = _input(2, input_shape, device)
    if runtime == "eager":
        return _torch_engine(runtime, model, input_shape, device)
    if runtime == "torchscript":
        path = work_dir / f"{name}.ts"
        export_torchscript(model, example, path)
        with _quiet():
            loaded = torch.jit.load(str(path), map_location=device)
        loaded.eval()
        return _torch_engine(runtime, loaded, input_shape, device)
    if runtime == "onnxruntime":
        path = work_dir / f"{name}.onnx"
        cpu_model = copy.deepcopy(model).cpu().eval() if device.type != "cpu" else model
        export_onnx(cpu_model, example.cpu(), path)
        return _onnx_engine(path, input_shape, device, threads)
    raise InvalidConfigError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.jit's deprecation notice on load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        yield


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
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
    with _torch_threads(cfg.threads):
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
    engines = {n: _onnx_engine(Path(paths[n]), input_shape, device, cfg.threads) for n in names}
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
    "RUNTIMES",
    "Engine",
    "compare_latency",
    "cpu_model",
    "describe_device",
    "environment",
    "measure_latency",
    "prepare_engine",
    "time_onnx_files",
]
