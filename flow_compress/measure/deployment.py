"""End-to-end latency on the deployment a latency target is measured on.

A ``DeploymentConfig`` names a runtime, device, provider, batch size, dtype and thread count.
This module checks that this machine can run it (``check_available``, before any work
starts), loads a model into it (``DeploymentTimer.engine``) and times it the way
``measure.latency`` does: warm-up, then the median of timed runs, synchronised on CUDA.

Per-step timings (``DeploymentTimer.time``) measure one model; the final verdict
(``DeploymentTimer.compare``) interleaves base and pruned run by run, so load on the machine
hits both alike and cancels in the ratio. The spread of the pruned model's runs (its
interquartile range relative to the median) is kept: a speed-up inside that noise is not
called faster.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flow_compress.config import DeploymentConfig
from flow_compress.errors import DeploymentUnavailableError
from flow_compress.export import EAGER_RUNTIME
from flow_compress.export._common import cpu_eval, run_chunks
from flow_compress.measure.environment import describe_device
from flow_compress.measure.latency import (
    Engine,
    Runner,
    _time_once,
    torch_engine,
    torch_threads,
)
from flow_compress.schema import DeploymentParity


def device_of(dep: DeploymentConfig) -> torch.device:
    return torch.device("cuda" if dep.device == "cuda" else "cpu")


def check_available(dep: DeploymentConfig) -> None:
    """Raise ``DeploymentUnavailableError`` when this machine cannot run ``dep``: CUDA asked
    for and no GPU visible to torch, or ONNX Runtime without the execution provider asked for.
    Never falls back silently: a latency target timed on another device means nothing."""
    caps = capabilities()
    providers = [str(p) for p in caps["onnxruntime_providers"]]  # type: ignore[attr-defined]
    why = dep.refusal(bool(caps["cuda"]), providers)
    if why is not None:
        raise DeploymentUnavailableError(why)


def capabilities() -> dict[str, object]:
    """What deployments this machine can run: whether torch sees CUDA, and ONNX Runtime's
    execution providers (published by the workers so the API can refuse a deployment no
    worker runs)."""
    import onnxruntime as ort

    return {
        "cuda": bool(torch.cuda.is_available()),
        "onnxruntime_providers": list(ort.get_available_providers()),
    }


class _Cast(nn.Module):
    """float16 weights and compute behind float32 input and output, so every engine is fed
    the same tensors and its logits compare with the float32 model's."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


@dataclass(frozen=True)
class Timing:
    """Median milliseconds per batch and the interquartile range of the runs, relative to the
    median (0.05: the middle half of the runs lay within 5 % of the median's size)."""

    ms: float
    spread: float


@dataclass(frozen=True)
class Comparison:
    base: Timing
    pruned: Timing
    # The timed pruned engine's predictions against eager float32, when asked for.
    parity: DeploymentParity | None = None

    @property
    def speedup(self) -> float:
        return self.base.ms / self.pruned.ms if self.pruned.ms > 0 else float("nan")


def _summary(times: list[float]) -> Timing:
    med = statistics.median(times)
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        spread = (q[2] - q[0]) / med if med > 0 else 0.0
    else:
        spread = 0.0
    return Timing(med, spread)


class DeploymentTimer:
    """Loads models into the deployment ``dep`` for inputs of ``input_shape`` (C, H, W) and
    times them. The ONNX and TorchScript files an engine needs live in a temporary folder
    that is gone when the measurement returns."""

    def __init__(self, dep: DeploymentConfig, input_shape: tuple[int, int, int]) -> None:
        self.dep = dep
        self.input_shape = input_shape
        self.device = device_of(dep)

    @property
    def device_label(self) -> str:
        with torch_threads(self.dep.threads):
            return describe_device(self.device)

    def engine(self, model: nn.Module, name: str, work_dir: Path) -> Engine:
        """``model`` (not changed: a copy is moved, cast and exported to ``work_dir``) loaded
        into the deployment's runtime."""
        dep = self.dep
        m = copy.deepcopy(model).float().eval()
        if dep.runtime == "onnxruntime":
            from flow_compress.export.onnx import export_onnx, file_engine
            from flow_compress.measure.latency import random_input

            path = work_dir / f"{name}.onnx"
            export_onnx(m.cpu(), random_input(2, self.input_shape, torch.device("cpu")), path)
            if dep.dtype == "fp16":
                from flow_compress.export import get_quantizer

                half = work_dir / f"{name}.fp16.onnx"
                get_quantizer("fp16").write(path, half, work_dir, None, None)  # type: ignore[arg-type]
                path = half
            return file_engine(
                path,
                self.input_shape,
                self.device,
                dep.threads,
                tensorrt=dep.provider == "tensorrt",
            )
        m = m.to(self.device)
        if dep.dtype == "fp16":
            m = _Cast(m).eval()
        if dep.runtime == EAGER_RUNTIME:
            return torch_engine(EAGER_RUNTIME, m, self.input_shape, self.device)
        from flow_compress.export import exporter_for_runtime

        exporter = exporter_for_runtime(dep.runtime)
        assert exporter.engine is not None
        return exporter.engine(m, self.input_shape, self.device, work_dir, name, dep.threads)

    def _runs(self, run: Runner, device: torch.device) -> list[float]:
        for _ in range(self.dep.warmup):
            run()
        return [_time_once(run, device) for _ in range(self.dep.runs)]

    def time(self, model: nn.Module) -> Timing:
        """Median latency of ``model`` on the deployment at its batch size."""
        with torch_threads(self.dep.threads), tempfile.TemporaryDirectory() as tmp:
            eng = self.engine(model, "model", Path(tmp))
            return _summary(self._runs(eng.runner(self.dep.batch_size), eng.device))

    def parity(
        self, model: nn.Module, inputs: torch.Tensor, min_agreement: float
    ) -> DeploymentParity:
        """``model`` loaded into the deployment and checked as ``compare`` checks the pruned
        engine it timed (``_parity``)."""
        with torch_threads(self.dep.threads), tempfile.TemporaryDirectory() as tmp:
            return self._parity(
                self.engine(model, "parity", Path(tmp)), model, inputs, min_agreement
            )

    def _parity(
        self, eng: Engine, model: nn.Module, inputs: torch.Tensor, min_agreement: float
    ) -> DeploymentParity:
        """``eng`` (``model`` in the deployment) run on ``inputs`` (float32, CPU) in batches of
        the deployment's size, against the eager float32 model on the CPU: the latency was
        measured on this engine, so its predictions must be the model's."""
        if eng.predict is None:
            raise DeploymentUnavailableError(
                f"deployment {self.dep.label()}: its engine cannot run real inputs"
            )
        x = inputs.detach().to("cpu", torch.float32)
        step = self.dep.batch_size
        got = torch.cat([eng.predict(x[i : i + step]) for i in range(0, len(x), step)])
        with cpu_eval(model) as ref_model, torch.no_grad():
            want = run_chunks(lambda b: ref_model(b).float(), x)
        agree = round(float((got.argmax(1) == want.argmax(1)).double().mean() * 100), 3)
        diff = float((got - want).abs().max())
        return DeploymentParity(
            samples=len(x),
            top1_agreement=agree,
            max_abs_diff=diff if math.isfinite(diff) else float("inf"),
            min_agreement=min_agreement,
            passed=agree >= min_agreement,
        )

    def compare(
        self,
        base: nn.Module,
        pruned: nn.Module,
        parity_inputs: torch.Tensor | None = None,
        min_agreement: float = 99.0,
    ) -> Comparison:
        """Both models timed alternately (the order flips every round), ``dep.runs`` each:
        the verdict's measurement. With ``parity_inputs``, the pruned engine just timed is
        also checked against eager float32 (``Comparison.parity``), so an expensive engine
        (a TensorRT build) is made once."""
        with torch_threads(self.dep.threads), tempfile.TemporaryDirectory() as tmp:
            eb = self.engine(base, "base", Path(tmp))
            ep = self.engine(pruned, "pruned", Path(tmp))
            rb, rp = eb.runner(self.dep.batch_size), ep.runner(self.dep.batch_size)
            for _ in range(self.dep.warmup):
                rb()
                rp()
            tb: list[float] = []
            tp: list[float] = []
            for i in range(self.dep.runs):
                pair = ((rb, tb), (rp, tp)) if i % 2 == 0 else ((rp, tp), (rb, tb))
                for run, out in pair:
                    out.append(_time_once(run, eb.device))
            parity = (
                self._parity(ep, pruned, parity_inputs, min_agreement)
                if parity_inputs is not None
                else None
            )
        return Comparison(_summary(tb), _summary(tp), parity)


__all__ = [
    "Comparison",
    "DeploymentTimer",
    "Timing",
    "capabilities",
    "check_available",
    "device_of",
]
