"""Export a model to TorchScript and ONNX, and check the artifacts against the eager model.

Artifacts are produced from a CPU, float32, eval-mode view of the model (``export_model``): a
trace taken on CUDA can bake device-specific constants into the graph, and CPU artifacts load
anywhere. Each file is written to a private temporary location first and moved into place only
once the exporter has finished, so a failed export never leaves a half-written file behind.

ONNX: torch 2.14's legacy TorchScript-based exporter (``dynamo=False``) is used first. It still
ships, honours the requested opset, writes a single file and exports the registered
architectures in well under a second; the ``torch.export``-based exporter takes 5-20 s per model
and raises the opset to at least 18. The latter is the fallback when the legacy exporter fails
or is gone. Either way the output must be one self-contained ``.onnx`` file with input
``input``, output ``logits`` and a dynamic batch dimension, and it must pass ``onnx.checker``.
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from flow_compress.config import ExportConfig
from flow_compress.errors import ExportError, ExportParityError
from flow_compress.schema import ParityRecord

Format = Literal["torchscript", "onnx"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
FILE_NAMES: dict[str, str] = {"torchscript": "model.ts", "onnx": "model.onnx"}

# The dynamo exporter has no op implementations below opset 18 and its down-conversion fails on
# common graphs (Reduce* axes), so it is asked for at least this opset.
_DYNAMO_MIN_OPSET = 18
# Parity inference runs in chunks so that large parity sets do not need one huge batch.
_PARITY_CHUNK = 32


# --------------------------------------------------------------------------- helpers


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _cause(exc: BaseException, limit: int = 400) -> str:
    """One-line summary of an exception; exporter messages can embed whole IR graphs and
    terminal colour codes."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[:limit] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _logits(output: object, fmt: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    raise ExportError(
        f"{fmt} export needs a model that returns one logits tensor, got {type(output).__name__}"
    )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _cpu_eval(model: nn.Module) -> Iterator[nn.Module]:
    """A CPU, eval-mode module equal to ``model``; the caller's model is never moved.

    A model already on the CPU is used in place (its training flag is restored afterwards);
    one on another device is deep-copied to the CPU.
    """
    if _model_device(model).type == "cpu":
        with _eval_mode(model) as m:
            yield m
    else:
        yield copy.deepcopy(model).cpu().eval()


@contextlib.contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """A private folder next to ``path`` for the exporter's output; removed on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """Route attention through ordinary ops while the legacy ONNX exporter traces.

    In eval mode without gradients ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
    call fused native kernels that the legacy exporter cannot translate (torchvision's ViT).
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence torch.jit's deprecation notice, which every save/load/trace repeats."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        yield


def _verification_batch(example: torch.Tensor) -> torch.Tensor:
    """Inputs for checking a trace: another batch size, and values the trace has not seen."""
    return torch.cat([example, example.flip(-1)], dim=0)


def _outputs_match(got: torch.Tensor, ref: torch.Tensor) -> bool:
    if got.shape != ref.shape:
        return False
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return bool(torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * scale))


# --------------------------------------------------------------------------- TorchScript


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, bool]:
    """Trace ``model``; the flag says whether the tracer warned about Python control flow."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # check_trace compares graphs of two invocations and rejects models whose graphs are
        # merely renamed (torchvision's ViT); faithfulness is checked on outputs instead.
        traced = torch.jit.trace(model, example, check_trace=False)
    suspicious = any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
    return traced, suspicious


def _script(model: nn.Module) -> torch.jit.ScriptModule:
    with _quiet_jit():
        return torch.jit.script(model)


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``model`` as a TorchScript archive at ``path``.

    The model is traced in eval mode without gradients on ``example``'s device (pass a CPU model
    and example for portable artifacts; ``export_model`` does). A trace is kept only if it
    reproduces the eager outputs on a batch of another size and other values. When tracing
    fails, disagrees, or the tracer warned about data-dependent Python control flow, the model
    is scripted instead (and the script verified the same way); a warned-about trace that still
    agrees is the last resort when scripting fails. The model's training flag is restored.

    Raises ``ExportError`` naming the cause when no faithful TorchScript module can be made.
    """
    path = Path(path)
    check = _verification_batch(example)
    with _eval_mode(model), torch.no_grad():
        reference = _logits(model(check), "torchscript")
        problems: list[str] = []
        fallback: torch.jit.ScriptModule | None = None
        chosen: torch.jit.ScriptModule | None = None
        try:
            traced, suspicious = _trace(model, example)
            faithful = _outputs_match(_logits(traced(check), "torchscript"), reference)
        except Exception as exc:
            problems.append(f"tracing failed ({_cause(exc)})")
        else:
            if not faithful:
                problems.append("the trace does not reproduce the eager outputs")
            elif suspicious:
                fallback = traced
            else:
                chosen = traced
        if chosen is None:
            try:
                scripted = _script(model)
                faithful = _outputs_match(_logits(scripted(check), "torchscript"), reference)
            except Exception as exc:
                problems.append(f"scripting failed ({_cause(exc)})")
            else:
                if faithful:
                    chosen = scripted
                else:
                    problems.append("the scripted module does not reproduce the eager outputs")
        chosen = chosen or fallback
    if chosen is None:
        raise ExportError("torchscript export failed: " + "; ".join(problems))
    with _staging(path) as folder:
        staged = folder / path.name
        try:
            with _quiet_jit():
                torch.jit.save(chosen, str(staged))
        except Exception as exc:
            raise ExportError(f"torchscript export failed: saving failed ({_cause(exc)})") from exc
        staged.replace(path)


# --------------------------------------------------------------------------- ONNX


def _export_onnx_legacy(model: nn.Module, example: torch.Tensor, dest: Path, opset: int) -> None:
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
        return f"onnx.checker rejected the model ({_cause(exc)})"
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
    path = Path(path)
    causes: list[str] = []
    with _eval_mode(model), torch.no_grad(), _staging(path) as folder:
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
                causes.append(f"{name} exporter: {_cause(exc)}")
                continue
            problem = _onnx_file_problem(folder, dest)
            if problem is not None:
                causes.append(f"{name} exporter {problem}")
                continue
            dest.replace(path)
            return
    raise ExportError("onnx export failed: " + "; ".join(causes))


# --------------------------------------------------------------------------- parity


def _run_chunks(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    outs = [fn(inputs[i : i + _PARITY_CHUNK]) for i in range(0, len(inputs), _PARITY_CHUNK)]
    return torch.cat(outs, dim=0)


def _artifact_logits(fmt: Format, path: Path, inputs: torch.Tensor) -> torch.Tensor:
    if fmt == "torchscript":
        try:
            with _quiet_jit():
                loaded = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ExportError(
                f"torchscript artifact {path.name} cannot be loaded ({_cause(exc)})"
            ) from exc
        loaded.eval()

        def run_ts(x: torch.Tensor) -> torch.Tensor:
            return _logits(loaded(x), "torchscript").float()

        with torch.no_grad():
            return _run_chunks(run_ts, inputs)

    if fmt == "onnx":
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(
                f"onnx artifact {path.name} cannot be loaded ({_cause(exc)})"
            ) from exc

        def run_ort(x: torch.Tensor) -> torch.Tensor:
            feed = {INPUT_NAME: np.ascontiguousarray(x.numpy(), dtype=np.float32)}
            return torch.from_numpy(session.run([OUTPUT_NAME], feed)[0])

        try:
            return _run_chunks(run_ort, inputs)
        except Exception as exc:
            raise ExportError(
                f"onnx artifact {path.name} fails on a batch of {min(len(inputs), _PARITY_CHUNK)} "
                f"({_cause(exc)})"
            ) from exc

    raise ValueError(f"unknown export format {fmt!r}; expected 'torchscript' or 'onnx'")


def check_parity(
    fmt: Format, path: Path, model: nn.Module, inputs: torch.Tensor, atol: float
) -> ParityRecord:
    """Reload an exported artifact and compare its logits with the eager model's.

    The artifact runs on the CPU (``torch.jit.load`` / ONNX Runtime's CPU provider) on
    ``inputs`` in chunks of up to 32, so the dynamic batch axis is exercised at batch sizes
    other than the export example's. The reference is the eager model in eval mode, float32, on
    the CPU (deep-copied there if it lives elsewhere; the caller's model is not moved).

    Returns a passing ``ParityRecord`` with the max absolute difference over all logits.
    Raises ``ExportParityError`` naming the format and the difference when it exceeds ``atol``
    (or the shapes disagree), and ``ExportError`` when the artifact cannot be loaded or run.
    """
    if len(inputs) == 0:
        raise ValueError("check_parity needs at least one input")
    path = Path(path)
    x = inputs.detach().to("cpu", torch.float32)
    with _cpu_eval(model) as ref_model, torch.no_grad():
        reference = _run_chunks(lambda b: _logits(ref_model(b), fmt).float(), x)
    got = _artifact_logits(fmt, path, x)
    if got.shape != reference.shape:
        raise ExportParityError(
            f"{fmt} artifact returns logits of shape {tuple(got.shape)}, "
            f"the eager model {tuple(reference.shape)}"
        )
    diff = float((got - reference).abs().max())
    if not np.isfinite(diff) or diff > atol:
        raise ExportParityError(
            f"{fmt} artifact differs from the eager model by {diff:.3g} "
            f"(max abs diff over {len(x)} samples, tolerance {atol:.3g})"
        )
    return ParityRecord(format=fmt, max_abs_diff=diff, samples=len(x), passed=True)


# --------------------------------------------------------------------------- pipeline entry


def export_model(
    model: nn.Module, inputs: torch.Tensor, out_dir: Path, cfg: ExportConfig
) -> list[ParityRecord]:
    """Export ``model`` in every format of ``cfg.formats`` into ``out_dir`` and check parity.

    Writes ``model.ts`` (TorchScript) and/or ``model.onnx`` (opset ``cfg.onnx_opset``).
    Exports are made from a CPU float32 eval-mode view of the model (a deep copy when the model
    lives on another device), so the artifacts are portable and the caller's model keeps its
    device and training flag. The export example is two real samples (batch 2: a batch of one
    lets exporters specialise the batch dimension); parity then runs on
    ``inputs[:cfg.parity_samples]`` in batches of up to 32.

    Returns one passing ``ParityRecord`` per format, in ``cfg.formats`` order.
    Raises ``ExportError`` when an exporter fails, ``ExportParityError`` when an artifact
    disagrees with the eager model by more than ``cfg.parity_atol``.
    """
    if len(inputs) == 0:
        raise ValueError("export_model needs at least one real input sample")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = inputs.detach().to("cpu", torch.float32)
    example = x[:2] if len(x) >= 2 else torch.cat([x, x], dim=0)
    parity_inputs = x[: cfg.parity_samples]
    records: list[ParityRecord] = []
    with _cpu_eval(model) as cpu_model:
        for fmt in dict.fromkeys(cfg.formats):
            path = out_dir / FILE_NAMES[fmt]
            if fmt == "torchscript":
                export_torchscript(cpu_model, example, path)
            else:
                export_onnx(cpu_model, example, path, opset=cfg.onnx_opset)
            records.append(check_parity(fmt, path, cpu_model, parity_inputs, cfg.parity_atol))
    return records


__all__ = [
    "FILE_NAMES",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "Format",
    "check_parity",
    "export_model",
    "export_onnx",
    "export_torchscript",
]
