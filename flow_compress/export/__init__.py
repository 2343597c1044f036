"""Artifact formats: the pruned model as files other runtimes load, each checked before it is
published.

Two kinds of plug-in, one registry shape (``flow_compress._registry``):

- an ``Exporter`` writes a format from the eager pruned model (``export.formats``), reloads
  it for the parity check against the eager logits (``flow_compress.export.parity``), and may
  name the latency runtime that times it (``latency.runtimes``);
- a ``Quantizer`` writes a quantized variant of the ONNX artifact (``quantize.modes``),
  checked by top-1 agreement with it (``flow_compress.export.quantize``).

One module per format (``torchscript``, ``onnx``, ``int8_static``, ``int8_dynamic``,
``fp16``) registers it and is imported at the bottom. Importing them needs no torch (their
callables import what they use when they run), so the HTTP layer can validate format names
against these registries. An unknown name is an ``invalid_config`` error listing the
registered ones, never a silent fallback to another format.

Adding a format: write ``flow_compress/export/<format>.py`` with its ``register_exporter``
(or ``register_quantizer``) call and import it here (README, "Extending flow-compress").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flow_compress._registry import Registry
from flow_compress.errors import InvalidConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from flow_compress.config import ExportConfig, QuantizeConfig
    from flow_compress.contract import InputContract
    from flow_compress.measure.latency import Engine

# Every artifact takes one float32 NCHW input and returns the logits, batch dimension dynamic.
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class Exporter:
    """A format made from the eager model.

    - ``export(model, example, path, cfg)``: write the artifact at ``path`` from ``model`` (CPU,
      float32, eval mode; the caller restores its mode) traced on ``example`` (a real batch of
      two); raise ``ExportError`` naming the cause.
    - ``load(path)``: reload the artifact on the CPU as a function from a float32 batch to
      float32 logits (the parity check runs it on real inputs in chunks); raise
      ``ExportError`` when it cannot be loaded or run.
    - ``runtime``/``runtime_label``/``engine``: the latency runtime that times this format
      (its name in ``latency.runtimes`` and in reports), and how to load a model into it on a
      device: ``engine(model, input_shape, device, work_dir, name, threads) -> Engine``.
    - ``embed(path, contract)``: write the input contract into the artifact in place (ONNX
      ``metadata_props``, TorchScript ``_extra_files``); called after ``export`` and before
      the parity check. None: the format carries no metadata (``preprocessing.json`` beside
      it still does).
    """

    name: str
    file: str
    label: str
    export: Callable[[nn.Module, torch.Tensor, Path, ExportConfig], None]
    load: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]
    runtime: str | None = None
    runtime_label: str | None = None
    engine: (
        Callable[[nn.Module, tuple[int, int, int], torch.device, Path, str, int | None], Engine]
        | None
    ) = None
    embed: Callable[[Path, InputContract], None] | None = None


@dataclass(frozen=True)
class Quantizer:
    """A quantized variant of the FP32 ONNX artifact.

    ``write(fp32, dest, work, cfg, calibration)`` writes the variant of ``fp32`` at ``dest``
    (``work`` is a private folder for intermediate files; ``calibration`` holds float32 NCHW
    validation images) and returns how many calibration images it used, or None when it uses
    none. The caller stages, checks the input/output names and wraps failures
    (``export.quantize.quantize_file``). ``label`` names its row in the combination table;
    ``precision`` is ``int8``, ``fp16``, ...
    """

    name: str
    file: str
    label: str
    precision: str
    write: Callable[[Path, Path, Path, QuantizeConfig, np.ndarray | None], int | None]


_EXPORTERS: Registry[Exporter] = Registry("export format", InvalidConfigError)
_QUANTIZERS: Registry[Quantizer] = Registry("quantization mode", InvalidConfigError)


def register_exporter(exporter: Exporter) -> Exporter:
    """Register a format; a duplicate name raises ``ValueError``."""
    return _EXPORTERS.register(exporter)


def unregister_exporter(name: str) -> Exporter:
    return _EXPORTERS.unregister(name)


def get_exporter(name: str) -> Exporter:
    """The format ``name``; unknown → ``InvalidConfigError`` listing the registered ones."""
    return _EXPORTERS.get(name)


def list_exporters() -> list[str]:
    return _EXPORTERS.names()


def exporters() -> Iterator[Exporter]:
    return iter(_EXPORTERS)


def register_quantizer(quantizer: Quantizer) -> Quantizer:
    """Register a quantization mode; a duplicate name raises ``ValueError``."""
    return _QUANTIZERS.register(quantizer)


def unregister_quantizer(name: str) -> Quantizer:
    return _QUANTIZERS.unregister(name)


def get_quantizer(name: str) -> Quantizer:
    return _QUANTIZERS.get(name)


def list_quantizers() -> list[str]:
    return _QUANTIZERS.names()


EAGER_RUNTIME = "eager"


def list_runtimes() -> list[str]:
    """Latency runtimes: ``eager`` (the module itself) and every format's runtime."""
    return [EAGER_RUNTIME, *sorted(e.runtime for e in _EXPORTERS if e.runtime)]


def exporter_for_runtime(runtime: str) -> Exporter:
    """The format timed by ``runtime``; unknown → ``InvalidConfigError`` listing them."""
    for exporter in _EXPORTERS:
        if exporter.runtime == runtime:
            return exporter
    raise InvalidConfigError(
        f"unknown runtime {runtime!r}; registered: {', '.join(list_runtimes())}"
    )


from flow_compress.export import (  # noqa: E402, F401  (each module registers its format)
    fp16,
    int8_dynamic,
    int8_static,
    onnx,
    torchscript,
)

__all__ = [
    "EAGER_RUNTIME",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "Exporter",
    "Quantizer",
    "exporter_for_runtime",
    "exporters",
    "get_exporter",
    "get_quantizer",
    "list_exporters",
    "list_quantizers",
    "list_runtimes",
    "register_exporter",
    "register_quantizer",
    "unregister_exporter",
    "unregister_quantizer",
]
