"""The ``int8_dynamic`` quantized variant: ``model.int8_dynamic.onnx``.

``onnxruntime.quantization.quantize_dynamic`` after ORT's pre-processing: INT8 weights,
activation ranges computed per batch at run time, no calibration. On convolutional networks
ORT runs it with ``ConvInteger``, which is often slower than FP32 on CPUs: it is offered for
size, and its latency is measured and reported, not assumed. The classifier stays FP32 by
default, as for ``int8_static``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flow_compress.export import Quantizer, register_quantizer

if TYPE_CHECKING:
    import numpy as np

    from flow_compress.config import QuantizeConfig


def write(
    fp32: Path, dest: Path, work: Path, cfg: QuantizeConfig, calibration: np.ndarray | None
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from flow_compress.export.quantize import classifier_nodes, preprocess

    src = preprocess(fp32, work / "preprocessed.onnx")
    quantize_dynamic(
        str(src),
        str(dest),
        per_channel=cfg.per_channel,
        # 8-bit unless asked: measured, 7 bits cost this mode agreement (README, Quantization).
        reduce_range=bool(cfg.reduce_range),
        weight_type=QuantType.QInt8,
        nodes_to_exclude=classifier_nodes(src) if cfg.keep_classifier_fp32 else None,
    )
    return None


register_quantizer(
    Quantizer(
        name="int8_dynamic",
        file="model.int8_dynamic.onnx",
        label="Pruned + INT8 dynamic",
        precision="int8",
        write=write,
    )
)
