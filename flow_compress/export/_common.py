"""Helpers every format shares: CPU eval-mode views, staged writes, quiet tracing, one-line
error causes, chunked inference. Private to ``flow_compress.export``."""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from flow_compress.errors import ExportError

# Inference on artifacts runs in chunks so that large parity sets do not need one huge batch.
CHUNK = 32


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cause(exc: BaseException, limit: int = 400) -> str:
    """One-line summary of an exception; exporter messages can embed whole IR graphs and
    terminal colour codes."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[:limit] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def logits_of(output: object, fmt: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    raise ExportError(
        f"{fmt} export needs a model that returns one logits tensor, got {type(output).__name__}"
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def cpu_eval(model: nn.Module) -> Iterator[nn.Module]:
    """A CPU, eval-mode module equal to ``model``; the caller's model is never moved.

    A model already on the CPU is used in place (its training flag is restored afterwards);
    one on another device is deep-copied to the CPU.
    """
    if model_device(model).type == "cpu":
        with eval_mode(model) as m:
            yield m
    else:
        yield copy.deepcopy(model).cpu().eval()


@contextlib.contextmanager
def staging(path: Path) -> Iterator[Path]:
    """A private folder next to ``path`` for the exporter's output; removed on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence torch.jit's deprecation notice, which every save/load/trace repeats."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        yield


def verification_batch(example: torch.Tensor) -> torch.Tensor:
    """Inputs for checking a trace: another batch size, and values the trace has not seen."""
    return torch.cat([example, example.flip(-1)], dim=0)


def outputs_match(got: torch.Tensor, ref: torch.Tensor) -> bool:
    if got.shape != ref.shape:
        return False
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return bool(torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * scale))


def run_chunks(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    outs = [fn(inputs[i : i + CHUNK]) for i in range(0, len(inputs), CHUNK)]
    return torch.cat(outs, dim=0)
