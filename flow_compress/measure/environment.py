"""The machine a report's numbers were measured on: software versions, CPU, GPUs, threads."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform

import torch


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
        # OS and architecture only: the kernel release is nobody's business outside the host.
        "platform": f"{platform.system()} {platform.machine()}",
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


__all__ = ["cpu_model", "describe_device", "environment"]
