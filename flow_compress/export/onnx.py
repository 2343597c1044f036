"""The ``onnx`` format: ``model.onnx``, one self-contained ONNX file (input ``input``, output
``logits``, dynamic batch), timed by the ``onnxruntime`` runtime.

torch 2.14's legacy TorchScript-based exporter (``dynamo=False``) is used first: it still
ships, honours the requested opset, writes a single file and exports the registered
architectures in well under a second; the ``torch.export``-based exporter takes 5-20 s per
model and raises the opset to at least 18. The latter is the fallback when the legacy exporter
fails or is gone. Either way the file must pass ``onnx.checker`` (``_onnx_file_problem``).

Every ONNX Runtime session of the library comes from ``session`` (CPU, or CUDA when asked and
available; full graph optimisation).

torch is imported where it is used, so that registering the format stays torch-free
(``flow_compress.export``).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flow_compress.errors import ExportError
from flow_compress.export import INPUT_NAME, OUTPUT_NAME, Exporter, register_exporter

if TYPE_CHECKING:
    import torch
    from torch import nn

    from flow_compress.config import ExportConfig
    from flow_compress.contract import InputContract
    from flow_compress.measure.latency import Engine

# The dynamo exporter has no op implementations below opset 18 and its down-conversion fails on
# common graphs (Reduce* axes), so it is asked for at least this opset.
_DYNAMO_MIN_OPSET = 18


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """Route attention through ordinary ops while the legacy ONNX exporter traces.

    In eval mode without gradients ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
    call fused native kernels that the legacy exporter cannot translate (torchvision's ViT).
    """
    import torch

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _export_onnx_legacy(model: nn.Module, example: torch.Tensor, dest: Path, opset: int) -> None:
    import torch

    with warnings.catch_warnings(), _no_mha_fastpath():
        # The legacy exporter announces its own deprecation on every call.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(dest),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


def _export_onnx_dynamo(model: nn.Module, example: torch.Tensor, dest: Path, opset: int) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(dest),
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=max(opset, _DYNAMO_MIN_OPSET),
            dynamic_shapes=({0: batch},),
        )


def _onnx_file_problem(folder: Path, dest: Path) -> str | None:
    """Why the exported file is unacceptable, or None: it must be one self-contained file
    with the agreed input and output names that passes the ONNX checker."""
    import onnx

    from flow_compress.export._common import cause

    if not dest.is_file():
        return "wrote no file"
    extra = sorted(p.name for p in folder.iterdir() if p != dest)
    if extra:
        return (
            f"wrote external data files ({', '.join(extra[:5])}); "
            "the model is probably over protobuf's 2 GiB limit"
        )
    try:
        onnx.checker.check_model(str(dest), full_check=True)
    except Exception as exc:
        return f"onnx.checker rejected the model ({cause(exc)})"
    graph = onnx.load(str(dest), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        return (
            f"expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
            f"got inputs {inputs} and outputs {outputs}"
        )
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            return f"fixed the batch dimension of {value.name!r} instead of leaving it dynamic"
    return None


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = 17) -> None:
    """Write ``model`` as one self-contained ONNX file at ``path``.

    Input ``input`` and output ``logits`` have a dynamic batch dimension; every other dimension
    is fixed by ``example``. The model is exported in eval mode without gradients on
    ``example``'s device (``export_model`` passes a CPU model). The legacy exporter writes
    ``opset``; the fallback exporter writes ``max(opset, 18)``. The result passes
    ``onnx.checker`` (full check). The model's training flag is restored.

    Raises ``ExportError`` naming the cause of every exporter tried when none succeeds.
    """
    import torch

    from flow_compress.export._common import cause, eval_mode, staging

    path = Path(path)
    causes: list[str] = []
    with eval_mode(model), torch.no_grad(), staging(path) as folder:
        dest = folder / path.name
        for name, exporter in (("legacy", _export_onnx_legacy), ("dynamo", _export_onnx_dynamo)):
            for stale in folder.iterdir():
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()
            try:
                exporter(model, example, dest, opset)
            except Exception as exc:
                causes.append(f"{name} exporter: {cause(exc)}")
                continue
            problem = _onnx_file_problem(folder, dest)
            if problem is not None:
                causes.append(f"{name} exporter {problem}")
                continue
            dest.replace(path)
            return
    raise ExportError("onnx export failed: " + "; ".join(causes))


def session(
    path: Path | bytes,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    *,
    tensorrt: bool = False,
    spinning: bool = True,
) -> object:
    """An ONNX Runtime session with full graph optimisation (``path``: a file, or a
    serialised model): on CUDA (its CUDA provider) when
    ``device`` is CUDA and the provider is installed, else on the CPU — ``session_device``
    says which. ``tensorrt`` puts ONNX Runtime's TensorRT provider first (CUDA for the nodes
    it leaves; the caller checked it is installed). ``threads`` sets the intra-op threads
    (one inter-op thread then). ``spinning=False`` makes the intra-op threads sleep between
    ops instead of spinning (what every timing session uses: ``file_engine``)."""
    import onnxruntime as ort
    import torch

    device = torch.device(device)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[object] = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        index = device.index if device.index is not None else torch.cuda.current_device()
        providers = [("CUDAExecutionProvider", {"device_id": index})]
        if tensorrt:
            providers.insert(0, ("TensorrtExecutionProvider", {"device_id": index}))
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=providers)


def _on_cuda(sess: object) -> bool:
    return "CUDAExecutionProvider" in sess.get_providers()  # type: ignore[attr-defined]


def run_logits(sess: object, inputs: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Float32 logits of ``inputs`` (float32 NCHW) from a session, in chunks of ``chunk``."""
    outs = [
        sess.run([OUTPUT_NAME], {INPUT_NAME: inputs[i : i + chunk]})[0]  # type: ignore[attr-defined]
        for i in range(0, len(inputs), chunk)
    ]
    return np.concatenate(outs).astype(np.float32)


def _export(model: nn.Module, example: torch.Tensor, path: Path, cfg: ExportConfig) -> None:
    export_onnx(model, example, path, opset=cfg.onnx_opset)


def load(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The file in an ONNX Runtime CPU session, as batch → float32 logits."""
    import torch

    from flow_compress.export._common import CHUNK, cause

    path = Path(path)
    try:
        sess = session(path)
    except Exception as exc:
        raise ExportError(f"onnx artifact {path.name} cannot be loaded ({cause(exc)})") from exc

    def run(x: torch.Tensor) -> torch.Tensor:
        feed = {INPUT_NAME: np.ascontiguousarray(x.numpy(), dtype=np.float32)}
        try:
            return torch.from_numpy(sess.run([OUTPUT_NAME], feed)[0])  # type: ignore[attr-defined]
        except Exception as exc:
            raise ExportError(
                f"onnx artifact {path.name} fails on a batch of {min(len(x), CHUNK)} ({cause(exc)})"
            ) from exc

    return run


def file_engine(
    path: Path,
    input_shape: tuple[int, int, int],
    device: torch.device,
    threads: int | None,
    *,
    tensorrt: bool = False,
) -> Engine:
    """An ONNX file in ONNX Runtime for timing: on CUDA with input and output bound in GPU
    memory (as eager CUDA timings are), else on the CPU (the device label says when CUDA was
    asked for but ONNX Runtime has no CUDA provider here).

    Timings always hold several engines in one process (base and pruned, run alternately),
    so CPU sessions are made with non-spinning threads: each session has its own intra-op
    pool, and a pool that keeps spinning after its run takes the cores from the next
    session's. Measured on 2 cores with ResNet-50 at 224 px, batch 1: two spinning sessions
    run alternately took 47-49 ms per run against 28 ms for one alone; without spinning,
    28 ms alternately and 29 ms alone."""
    import onnxruntime as ort
    import torch

    from flow_compress.measure.latency import Engine, Runner, describe_device, random_input

    sess = session(path, device, threads, tensorrt=tensorrt, spinning=False)

    def predict(x: torch.Tensor) -> torch.Tensor:
        feed = {INPUT_NAME: x.detach().cpu().numpy().astype(np.float32)}
        (out,) = sess.run([OUTPUT_NAME], feed)  # type: ignore[attr-defined]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    if _on_cuda(sess):
        index = device.index if device.index is not None else torch.cuda.current_device()

        def forward_cuda(batch_size: int) -> Runner:
            # Host copies would otherwise dominate small models.
            x = ort.OrtValue.ortvalue_from_numpy(
                random_input(batch_size, input_shape, torch.device("cpu")).numpy(), "cuda", index
            )
            binding = sess.io_binding()  # type: ignore[attr-defined]
            binding.bind_ortvalue_input(INPUT_NAME, x)
            binding.bind_output(OUTPUT_NAME, "cuda", index)

            def run() -> object:
                sess.run_with_iobinding(binding)  # type: ignore[attr-defined]
                binding.synchronize_outputs()
                return None

            return run

        return Engine(
            "onnxruntime", device, describe_device(device), input_shape, forward_cuda, predict
        )

    cpu = torch.device("cpu")
    label = describe_device(cpu)
    if device.type == "cuda":
        label += "; onnxruntime has no CUDA provider here, so this row ran on the CPU"

    def forward_cpu(batch_size: int) -> Runner:
        feed = {INPUT_NAME: random_input(batch_size, input_shape, cpu).numpy().astype(np.float32)}

        def run() -> object:
            return sess.run([OUTPUT_NAME], feed)  # type: ignore[attr-defined]

        return run

    return Engine("onnxruntime", cpu, label, input_shape, forward_cpu, predict)


def engine(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
    work_dir: Path,
    name: str,
    threads: int | None,
) -> Engine:
    """``model`` exported from a CPU copy to ``work_dir/<name>.onnx`` and loaded by
    ``file_engine``."""
    import copy

    from flow_compress.measure.latency import random_input

    path = Path(work_dir) / f"{name}.onnx"
    cpu_model = copy.deepcopy(model).cpu().eval() if device.type != "cpu" else model
    export_onnx(cpu_model, random_input(2, input_shape, device).cpu(), path)
    return file_engine(path, input_shape, device, threads)


def embed_contract(path: Path, contract: InputContract) -> None:
    """Write ``contract.metadata()`` into the ONNX file's ``metadata_props`` in place
    (atomically; other properties are kept, ours replaced)."""
    import onnx

    from flow_compress.artifacts import atomic_write_bytes

    path = Path(path)
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(contract.metadata())
    onnx.helper.set_model_props(model, props)
    atomic_write_bytes(path, model.SerializeToString())


def read_metadata(path: Path) -> dict[str, str]:
    """The ONNX file's ``metadata_props`` as a dict (the graph is not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


register_exporter(
    Exporter(
        name="onnx",
        file="model.onnx",
        label="ONNX",
        export=_export,
        load=load,
        runtime="onnxruntime",
        runtime_label="ONNX Runtime",
        engine=engine,
        embed=embed_contract,
    )
)
