"""Quantized ONNX variants of the pruned model, and the checks that gate their publication.

Pruning removes MACs; quantization shrinks the bytes each remaining MAC moves. The paper
combines IDAP++ with 8-bit quantization (HAWQ-V3, HAQ); the library does it with ONNX
Runtime's own tools on the exported ``model.onnx``, so the quantized files run where the FP32
one does. Each mode is a ``Quantizer`` in its own module (``int8_static``, ``int8_dynamic``,
``fp16``, whose docstrings give their choices); this module runs them and checks them.

Checks: every variant is loaded in ONNX Runtime (CPU) and compared with the FP32 ONNX model on
validation images disjoint from the calibration images where the split is large enough (never
the test split): top-1 agreement (percent) and the largest absolute logit difference. Failing
``min_agreement`` is an error (``QuantizationParityError``, code
``quantization_parity_failed``), not a note in the report: a job that publishes a file
promises it is usable, and a silently degraded model in a deployment is worse than a failed
job whose message names the variant, its agreement and the option to relax
(``quantize.min_agreement``) or the variant to drop. The max logit difference is recorded but
not gated: 8-bit logits legitimately differ by whole units while the decision agrees.
Top-1/top-5 on the test split are recorded for the report only.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flow_compress.config import LatencyConfig, QuantizeConfig
from flow_compress.data import DataSplits
from flow_compress.errors import QuantizationError, QuantizationParityError
from flow_compress.export import INPUT_NAME, OUTPUT_NAME, get_quantizer
from flow_compress.export.onnx import export_onnx, read_metadata, run_logits, session
from flow_compress.measure.latency import time_onnx_files
from flow_compress.schema import CombinationRow, QuantizedArtifact

# Ops that may sit between the classifier's weight op and the graph output (bias add, shape
# plumbing); the walk up from the output stops at the first weight op.
_PASS_THROUGH = {"Add", "Reshape", "Flatten", "Squeeze", "Identity", "Cast"}
_WEIGHT_OPS = {"Gemm", "MatMul", "Conv"}


@dataclass(frozen=True)
class CheckSet:
    """Validation images for calibration and for the parity check (float32, NCHW)."""

    calibration: np.ndarray
    parity: np.ndarray


# --------------------------------------------------------------------------- data


def validation_sets(data: DataSplits, cfg: QuantizeConfig) -> CheckSet:
    """The first ``calibration_samples`` validation images calibrate; the last
    ``parity_samples`` check. They are disjoint when the split holds both; on a small split
    they overlap (the whole split is then used for each). One pass over the validation split,
    holding only those images."""
    head: list[torch.Tensor] = []
    got = 0
    tail: collections.deque[torch.Tensor] = collections.deque()
    tail_n = 0
    for x, _ in data.loader("val", data.config.eval_batch_size):
        if got < cfg.calibration_samples:
            head.append(x[: cfg.calibration_samples - got])
            got += len(head[-1])
        tail.append(x)
        tail_n += len(x)
        while tail and tail_n - len(tail[0]) >= cfg.parity_samples:
            tail_n -= len(tail.popleft())
    if not head:
        raise QuantizationError("the validation split is empty: nothing to calibrate or check")
    parity = torch.cat(list(tail))[-cfg.parity_samples :]
    return CheckSet(
        calibration=np.ascontiguousarray(torch.cat(head).numpy(), dtype=np.float32),
        parity=np.ascontiguousarray(parity.numpy(), dtype=np.float32),
    )


# --------------------------------------------------------------------------- ONNX Runtime


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """ORT's quantization tools print calibration chatter to stdout and log advice through the
    root logger; keep the caller's stdout (the CLI's output) and log readable. Errors still
    propagate as exceptions."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, logging.ERROR))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(previous)


def classifier_nodes(model_path: Path) -> list[str]:
    """Names of the nodes from the logits back to the weight op that computes them
    (e.g. ``/fc/Gemm``; or ``MatMul`` + bias ``Add``); ``[]`` when the output does not come
    from a weight op within a few plain steps."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name for t in graph.initializer}
    chain: list[str] = []
    name = OUTPUT_NAME
    for _ in range(8):
        node = producer.get(name)
        if node is None:
            return []
        chain.append(node.name)
        if node.op_type in _WEIGHT_OPS:
            return chain
        if node.op_type not in _PASS_THROUGH:
            return []
        upstream = [i for i in node.input if i and i not in initializers and i in producer]
        if len(upstream) != 1:
            return []
        name = upstream[0]
    return []


def _check_io(path: Path) -> None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [(i.name, i.type.tensor_type.elem_type) for i in graph.input]
    outputs = [(o.name, o.type.tensor_type.elem_type) for o in graph.output]
    fp32 = onnx.TensorProto.FLOAT
    if inputs != [(INPUT_NAME, fp32)] or outputs != [(OUTPUT_NAME, fp32)]:
        raise QuantizationError(
            f"{path.name}: expected float32 input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
            f"got inputs {inputs} and outputs {outputs}"
        )


# --------------------------------------------------------------------------- quantizers


def preprocess(fp32: Path, dest: Path) -> Path:
    """ONNX Runtime's quantization pre-processing (shape inference and graph optimisation),
    which ORT recommends before INT8 quantization; writes ``dest`` and returns it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(dest), skip_symbolic_shape=False)
    return dest


def _keep_metadata(fp32: Path, staged: Path) -> None:
    """Copy ``fp32``'s ``metadata_props`` the quantization tools dropped into ``staged``."""
    import onnx

    props = read_metadata(fp32)
    model = onnx.load(str(staged))
    have = {p.key: p.value for p in model.metadata_props}
    if all(have.get(k) == v for k, v in props.items()):
        return
    onnx.helper.set_model_props(model, {**have, **props})
    onnx.save(model, str(staged))


def quantize_file(
    mode: str,
    fp32: Path,
    dest: Path,
    cfg: QuantizeConfig,
    calibration: np.ndarray | None = None,
) -> int | None:
    """Write the ``mode`` variant (a registered ``Quantizer``) of the FP32 ONNX file ``fp32``
    to ``dest``, atomically.

    ``calibration`` (float32 NCHW validation images) is for modes that calibrate
    (``int8_static``); the number of images actually used is returned (``None`` for modes
    that use none). The file keeps float32 input ``input`` and output ``logits`` with a
    dynamic batch, and the FP32 file's ``metadata_props`` (the input contract, which a
    variant shares: same input). Raises ``QuantizationError`` naming the mode and the cause, and
    ``InvalidConfigError`` for an unregistered mode.
    """
    quantizer = get_quantizer(mode)
    fp32, dest = Path(fp32), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    staged = work / dest.name
    try:
        with _quiet_ort():
            used = quantizer.write(fp32, staged, work, cfg, calibration)
        _check_io(staged)
        _keep_metadata(fp32, staged)
        os.replace(staged, dest)
    except QuantizationError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
        raise QuantizationError(
            f"{mode} quantization of {fp32.name} failed ({type(exc).__name__}: {first})"
        ) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return used


# --------------------------------------------------------------------------- checks


def agreement(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement in percent and the largest absolute logit difference."""
    if len(reference) == 0:
        return 0.0, 0.0
    same = float((logits.argmax(1) == reference.argmax(1)).mean() * 100.0)
    return same, float(np.abs(logits - reference).max())


def accuracy_on_test(
    paths: dict[str, Path], data: DataSplits, batch_size: int
) -> dict[str, tuple[float, float]]:
    """Top-1 and top-5 (percent) of each ONNX file on the test split, in one pass over it."""
    sessions = {name: session(p) for name, p in paths.items()}
    hits1 = dict.fromkeys(paths, 0)
    hits5 = dict.fromkeys(paths, 0)
    total = 0
    for x, y in data.loader("test", batch_size):
        xs = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        labels = y.numpy().reshape(-1, 1)
        for name, sess in sessions.items():
            logits = run_logits(sess, xs)
            k = min(5, logits.shape[1])
            top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            hits1[name] += int((top[:, :1] == labels).sum())
            hits5[name] += int((top == labels).any(axis=1).sum())
        total += len(labels)
    if total == 0:
        return dict.fromkeys(paths, (0.0, 0.0))
    return {n: (100.0 * hits1[n] / total, 100.0 * hits5[n] / total) for n in paths}


def build_quantized(
    fp32: Path,
    out_dir: Path,
    data: DataSplits,
    cfg: QuantizeConfig,
    modes: Sequence[str] | None = None,
) -> list[QuantizedArtifact]:
    """Write every variant of ``cfg.modes`` (or ``modes``) of the FP32 ONNX file ``fp32`` into
    ``out_dir`` as its quantizer's ``file``, check each against ``fp32`` on validation images and
    measure it on the test split.

    Returns one ``QuantizedArtifact`` per mode, in the order asked (latency empty: the caller
    times all models together). Raises ``QuantizationParityError`` when any variant's top-1
    agreement is below ``cfg.min_agreement`` (all variants are checked first; the message
    names every failure), ``QuantizationError`` when a tool fails.
    """
    modes = list(cfg.modes if modes is None else modes)
    if not modes:
        return []
    out_dir = Path(out_dir)
    sets = validation_sets(data, cfg)
    reference = run_logits(session(fp32), sets.parity)
    records: list[QuantizedArtifact] = []
    paths: dict[str, Path] = {}
    checks: dict[str, tuple[float, float, int | None]] = {}
    for mode in modes:
        dest = out_dir / get_quantizer(mode).file
        used = quantize_file(mode, fp32, dest, cfg, sets.calibration)
        try:
            logits = run_logits(session(dest), sets.parity)
        except Exception as exc:
            raise QuantizationError(f"{dest.name} does not run in ONNX Runtime ({exc})") from exc
        same, diff = agreement(logits, reference)
        paths[mode] = dest
        checks[mode] = (same, diff, used)
    # Agreement decides first: a variant that fails it is never published, so the test split
    # is read only for variants that passed.
    failed = [m for m in modes if checks[m][0] < cfg.min_agreement]
    if failed:
        detail = "; ".join(
            f"{m}: top-1 agreement {round(checks[m][0], 3):.2f} % < {cfg.min_agreement:.2f} % "
            f"(max logit diff {checks[m][1]:.3g}, {len(sets.parity)} validation images)"
            for m in failed
        )
        raise QuantizationParityError(
            f"quantized model disagrees with the FP32 ONNX model: {detail}. Lower "
            "quantize.min_agreement or drop the mode from quantize.modes"
        )
    accuracy = accuracy_on_test(paths, data, data.config.eval_batch_size)
    for mode in modes:
        same, diff, used = checks[mode]
        top1, top5 = accuracy[mode]
        records.append(
            QuantizedArtifact(
                mode=mode,
                file=get_quantizer(mode).file,
                size_bytes=paths[mode].stat().st_size,
                agreement=round(same, 3),
                max_abs_diff=diff,
                samples=len(sets.parity),
                min_agreement=cfg.min_agreement,
                passed=True,
                top1=round(top1, 3),
                top5=round(top5, 3),
                calibration_samples=used,
            )
        )
    return records


# --------------------------------------------------------------------------- combination

DISTILLATION_NAMES: dict[str, str] = {
    "kd": "KD",
    "kd_features": "KD + features",
    "none": "CE only",
}


def _ort_devices(device: torch.device) -> list[str]:
    """CPU always; CUDA only where the job ran on CUDA and ORT has its CUDA provider."""
    import onnxruntime as ort

    devices = ["cpu"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        devices.append(str(device))
    return devices


def combination_table(
    base: nn.Module,
    base_metrics: tuple[float, float, int],
    pruned_onnx: Path,
    pruned_metrics: tuple[float, float, int],
    quantized: Sequence[QuantizedArtifact],
    input_shape: tuple[int, int, int],
    latency: LatencyConfig | None,
    device: torch.device | str,
    work_dir: Path,
    *,
    distillation: str,
) -> tuple[list[CombinationRow], list[QuantizedArtifact]]:
    """The paper-shaped combination table: baseline FP32, pruned FP32 and every quantized
    variant, with MACs, test top-1/top-5, ONNX size on disk and ONNX Runtime latency.

    ``base_metrics``/``pruned_metrics`` are (test top-1, test top-5, MACs). The base model is
    exported to ``work_dir`` (a CPU copy; the caller's model is not changed) so it is timed as
    an ONNX file like the others. With ``latency`` (None skips timing), all files are timed
    round-robin in this process (``time_onnx_files``) on the CPU provider at every batch size,
    and on CUDA too where ``device`` is CUDA and ONNX Runtime has the CUDA provider. Returns the
    rows and ``quantized`` with their ``latency_ms`` filled in.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    base_path = work_dir / "base.onnx"
    base_cpu = copy.deepcopy(base).cpu().eval()
    export_onnx(base_cpu, torch.zeros((2, *input_shape)), base_path)
    files: dict[str, Path] = {"base": base_path, "pruned": Path(pruned_onnx)}
    files |= {q.mode: Path(pruned_onnx).with_name(q.file) for q in quantized}
    timings: dict[str, dict[str, float]] = {name: {} for name in files}
    if latency is not None:
        for dev in _ort_devices(torch.device(device)):
            _, measured = time_onnx_files(files, input_shape, latency, dev)
            tag = "cpu" if dev == "cpu" else "cuda"
            for name, by_batch in measured.items():
                timings[name] |= {f"{tag}@b{b}": round(ms, 4) for b, ms in by_batch.items()}

    def speedup(name: str) -> dict[str, float]:
        return {
            k: round(timings["base"][k] / v, 4)
            for k, v in timings[name].items()
            if v > 0 and k in timings["base"]
        }

    rows = [
        CombinationRow(
            variant="Baseline (FP32)",
            precision="fp32",
            macs=base_metrics[2],
            top1=round(base_metrics[0], 3),
            top5=round(base_metrics[1], 3),
            size_bytes=base_path.stat().st_size,
            latency_ms=timings["base"],
            speedup=speedup("base"),
        ),
        CombinationRow(
            variant=f"Pruned + {DISTILLATION_NAMES.get(distillation, distillation)} (FP32)",
            precision="fp32",
            distillation=distillation,
            file=Path(pruned_onnx).name,
            macs=pruned_metrics[2],
            top1=round(pruned_metrics[0], 3),
            top5=round(pruned_metrics[1], 3),
            size_bytes=Path(pruned_onnx).stat().st_size,
            latency_ms=timings["pruned"],
            speedup=speedup("pruned"),
        ),
    ]
    timed: list[QuantizedArtifact] = []
    for q in quantized:
        quantizer = get_quantizer(q.mode)
        rows.append(
            CombinationRow(
                variant=quantizer.label,
                precision=quantizer.precision,
                distillation=distillation,
                file=q.file,
                macs=pruned_metrics[2],
                top1=q.top1,
                top5=q.top5,
                size_bytes=q.size_bytes,
                latency_ms=timings[q.mode],
                speedup=speedup(q.mode),
            )
        )
        timed.append(q.model_copy(update={"latency_ms": timings[q.mode]}))
    return rows, timed


__all__ = [
    "DISTILLATION_NAMES",
    "CheckSet",
    "accuracy_on_test",
    "agreement",
    "build_quantized",
    "classifier_nodes",
    "combination_table",
    "preprocess",
    "quantize_file",
    "validation_sets",
]
