"""``model.raw.onnx`` (``export.embed_preprocessing``): the ONNX model with the input
contract's preprocessing inside its graph, for deployments that hand it decoded images.

Its input ``image`` is ``uint8``, batch × height × width × channels (NHWC), already resized
(and cropped) to the contract's input size, in the contract's channel order; the graph does
cast → ÷ ``pixel_divisor`` → (x − mean) ÷ std → NCHW and then runs ``model.onnx``'s graph
unchanged. Output ``logits`` as in ``model.onnx``. ``model.onnx`` itself is left as it is, so
existing float32 NCHW deployments keep working.

The file carries the same contract in its ``metadata_props`` plus ``RAW_INPUT_KEY`` saying
what its input is. ``check_raw_parity`` compares it with ``model.onnx`` fed the normalised
tensor of the same images.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flow_compress.errors import ExportError, ExportParityError
from flow_compress.export import INPUT_NAME, OUTPUT_NAME
from flow_compress.schema import ParityRecord

if TYPE_CHECKING:
    from flow_compress.contract import InputContract

RAW_FILE = "model.raw.onnx"
RAW_INPUT_NAME = "image"
RAW_INPUT_KEY = "flow_compress.raw_input"
RAW_PARITY_FORMAT = "onnx_raw"


def write_raw_onnx(src: Path, dest: Path, contract: InputContract) -> None:
    """Write ``dest``: ``src`` (an ONNX model with float32 NCHW input ``input``) behind the
    contract's preprocessing, taking uint8 NHWC ``image``. Raises ``ExportError`` when the
    result fails ``onnx.checker``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from flow_compress.artifacts import atomic_write_bytes
    from flow_compress.export._common import cause

    model = onnx.load(str(src))
    graph = model.graph
    old = next((i for i in graph.input if i.name == INPUT_NAME), None)
    if old is None:
        raise ExportError(f"{Path(src).name} has no input {INPUT_NAME!r} to put preprocessing in")
    batch = old.type.tensor_type.shape.dim[0].dim_param or "batch"
    c = contract.channels
    image = helper.make_tensor_value_info(
        RAW_INPUT_NAME, TensorProto.UINT8, [batch, contract.height, contract.width, c]
    )
    consts = {
        "fc_pre_divisor": np.array(contract.pixel_divisor, dtype=np.float32),
        "fc_pre_mean": np.array(contract.mean, dtype=np.float32),
        "fc_pre_std": np.array(contract.std, dtype=np.float32),
    }
    # The same float32 operations, in the same order, as BatchTransform: /divisor, -mean,
    # /std (broadcast over the channel axis, last in NHWC), then the layout change.
    nodes = [
        helper.make_node("Cast", [RAW_INPUT_NAME], ["fc_pre_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["fc_pre_float", "fc_pre_divisor"], ["fc_pre_scaled"]),
        helper.make_node("Sub", ["fc_pre_scaled", "fc_pre_mean"], ["fc_pre_centred"]),
        helper.make_node("Div", ["fc_pre_centred", "fc_pre_std"], ["fc_pre_nhwc"]),
        helper.make_node("Transpose", ["fc_pre_nhwc"], [INPUT_NAME], perm=[0, 3, 1, 2]),
    ]
    graph.initializer.extend(numpy_helper.from_array(v, name=k) for k, v in consts.items())
    kept_inputs = [i for i in graph.input if i.name != INPUT_NAME]
    del graph.input[:]
    graph.input.extend([image, *kept_inputs])
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *body])
    props = {p.key: p.value for p in model.metadata_props}
    props.update(contract.metadata())
    props[RAW_INPUT_KEY] = (
        f"{RAW_INPUT_NAME}: uint8 NHWC (batch x {contract.height} x {contract.width} x {c}), "
        "already resized/cropped to the input size; the contract's normalisation and layout "
        "are inside the graph"
    )
    onnx.helper.set_model_props(model, props)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"{RAW_FILE} failed onnx.checker ({cause(exc)})") from exc
    atomic_write_bytes(dest, model.SerializeToString())


def check_raw_parity(
    raw_path: Path,
    onnx_path: Path,
    images: np.ndarray,
    normalised: np.ndarray,
    atol: float,
) -> ParityRecord:
    """Run ``raw_path`` on uint8 NHWC ``images`` and ``onnx_path`` on their ``normalised``
    float32 NCHW tensor (as the pipeline made it); both in ONNX Runtime on the CPU.

    Returns a passing ``ParityRecord`` (format ``onnx_raw``); raises ``ExportParityError``
    when the logits differ by more than ``atol`` or a top-1 class differs."""
    from flow_compress.export.onnx import run_logits, session

    raw = session(raw_path)
    outs = [
        raw.run([OUTPUT_NAME], {RAW_INPUT_NAME: images[i : i + 64]})[0]  # type: ignore[attr-defined]
        for i in range(0, len(images), 64)
    ]
    got = np.concatenate(outs).astype(np.float32)
    ref = run_logits(session(onnx_path), np.ascontiguousarray(normalised, dtype=np.float32))
    diff = float(np.abs(got - ref).max())
    same = bool((got.argmax(1) == ref.argmax(1)).all())
    if not np.isfinite(diff) or diff > atol or not same:
        raise ExportParityError(
            f"{RAW_FILE} fed uint8 images differs from model.onnx fed their normalised tensor "
            f"by {diff:.3g} (tolerance {atol:.3g}; same top-1 everywhere: {same})"
        )
    return ParityRecord(
        format=RAW_PARITY_FORMAT, max_abs_diff=diff, samples=len(images), passed=True
    )
