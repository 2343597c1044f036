"""The ``fp16`` variant: ``model.fp16.onnx``.

ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``, a maintained
derivative of onnxconverter-common's, so no extra dependency) with float32 input and output
kept, so callers feed the same tensors. CPUs mostly run it through inserted casts; it is meant
for GPUs and for halving the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flow_compress.errors import QuantizationError
from flow_compress.export import Quantizer, register_quantizer

if TYPE_CHECKING:
    import numpy as np

    from flow_compress.config import QuantizeConfig


def topological_sort(graph: object) -> None:
    """Reorder ``graph.node`` so every node follows its producers (Kahn's algorithm, stable).

    The float16 converter appends the casts it inserts for float32 I/O at the end of the node
    list; ONNX Runtime sorts on load, but onnx.checker (and other runtimes) require order.
    """
    nodes = list(graph.node)  # type: ignore[attr-defined]
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer}  # type: ignore[attr-defined]
    ready.add("")  # optional inputs are empty names
    ordered: list[object] = []
    pending = nodes
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise QuantizationError("the float16 graph has a cycle or a missing input")
        pending = rest
    del graph.node[:]  # type: ignore[attr-defined]
    graph.node.extend(ordered)  # type: ignore[attr-defined]


def write(
    fp32: Path, dest: Path, work: Path, cfg: QuantizeConfig, calibration: np.ndarray | None
) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    topological_sort(model.graph)
    onnx.save(model, str(dest))
    onnx.checker.check_model(str(dest), full_check=True)
    return None


register_quantizer(
    Quantizer(
        name="fp16",
        file="model.fp16.onnx",
        label="Pruned + FP16",
        precision="fp16",
        write=write,
    )
)
