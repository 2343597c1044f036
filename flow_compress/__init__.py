"""flow-compress: IDAP++ compression of PyTorch vision models.

The public API is imported lazily so that torch-free modules (``config``, ``schema``,
``errors``, ``refs``, ``contract``, ``artifacts`` and the registries of ``arch``, ``criteria``
and ``export``) can be used without importing torch — the HTTP layer relies on that.

Packages: ``pipeline`` (compress = prepare → stages → finalize → publish, and the preflight),
``criteria`` (stage-1 scores), ``arch`` (families, building models and loading weights, module
surgery, stage-2 blocks, attention heads), ``graph`` (DepGraph through torch-pruning, MACs and
the measured latency cost model), ``export`` (formats, parity, quantized variants), ``measure``
(accuracy, latency, deployments, environment), ``report`` (Markdown, plots).

Top-level modules are the two things every package shares: the torch-free vocabulary
(``config``, ``schema``, ``errors``, ``refs``, ``contract``, ``artifacts``, and ``_registry``,
the one registry shape) and the workflow around a compression (``data``, ``train``,
``recovery``, ``plan``, ``cli``). Names starting with an underscore are internal."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CompressionConfig": "flow_compress.config",
    "TrainConfig": "flow_compress.config",
    "CompressionReport": "flow_compress.schema",
    "ProgressEvent": "flow_compress.schema",
    "FlowCompressError": "flow_compress.errors",
    "compress": "flow_compress.pipeline",
    "run_pipeline": "flow_compress.pipeline",
    "load_report": "flow_compress.report",
    "train": "flow_compress.train",
    "build_model": "flow_compress.arch.models",
    "load_weights": "flow_compress.arch.models",
    "load_dataset": "flow_compress.data",
    "rebuild": "flow_compress.plan",
    "read_plan": "flow_compress.plan",
    "list_architectures": "flow_compress.arch",
}

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "FlowCompressError",
    "ProgressEvent",
    "TrainConfig",
    "build_model",
    "compress",
    "list_architectures",
    "load_dataset",
    "load_report",
    "load_weights",
    "read_plan",
    "rebuild",
    "run_pipeline",
    "train",
]

if TYPE_CHECKING:
    from flow_compress.arch import list_architectures
    from flow_compress.arch.models import build_model, load_weights
    from flow_compress.config import CompressionConfig, TrainConfig
    from flow_compress.data import load_dataset
    from flow_compress.errors import FlowCompressError
    from flow_compress.pipeline import compress, run_pipeline
    from flow_compress.plan import read_plan, rebuild
    from flow_compress.report import load_report
    from flow_compress.schema import CompressionReport, ProgressEvent
    from flow_compress.train import train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flow_compress' has no attribute {name!r}")
    return getattr(import_module(module), name)
