"""Export every configured format and check each artifact against the eager model.

Artifacts are produced from a CPU, float32, eval-mode view of the model: a trace taken on CUDA
can bake device-specific constants into the graph, and CPU artifacts load anywhere. Each
exporter writes through a private staging folder and moves its file into place only once it
has finished, so a failed export never leaves a half-written file behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from flow_compress.config import ExportConfig
from flow_compress.contract import InputContract
from flow_compress.errors import ExportParityError
from flow_compress.export import get_exporter
from flow_compress.export._common import cpu_eval, logits_of, run_chunks
from flow_compress.schema import ParityRecord


def check_parity(
    fmt: str, path: Path, model: nn.Module, inputs: torch.Tensor, atol: float, rtol: float = 0.0
) -> ParityRecord:
    """Reload an artifact of format ``fmt`` and compare its logits with the eager model's.

    The artifact runs on the CPU (the format's ``load``) on ``inputs`` in chunks of up to 32,
    so the dynamic batch axis is exercised at batch sizes other than the export example's. The
    reference is the eager model in eval mode, float32, on the CPU (deep-copied there if it
    lives elsewhere; the caller's model is not moved).

    Returns a ``ParityRecord`` with the max absolute difference over all logits. Raises
    ``ExportParityError`` naming the format and the difference when it exceeds
    ``atol + rtol * max|eager logits|`` (or the shapes disagree), ``ExportError`` when the
    artifact cannot be loaded or run, and ``InvalidConfigError`` for an unregistered format.
    """
    if len(inputs) == 0:
        raise ValueError("check_parity needs at least one input")
    run = get_exporter(fmt).load(Path(path))
    x = inputs.detach().to("cpu", torch.float32)
    with cpu_eval(model) as ref_model, torch.no_grad():
        reference = run_chunks(lambda b: logits_of(ref_model(b), fmt).float(), x)
    got = run_chunks(run, x)
    if got.shape != reference.shape:
        raise ExportParityError(
            f"{fmt} artifact returns logits of shape {tuple(got.shape)}, "
            f"the eager model {tuple(reference.shape)}"
        )
    diff = float((got - reference).abs().max())
    scale = float(reference.abs().max())
    tolerance = atol + rtol * scale
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportParityError(
            f"{fmt} artifact differs from the eager model by {diff:.3g} "
            f"(max abs diff over {len(x)} samples, tolerance {tolerance:.3g} for logits up to "
            f"{scale:.3g})"
        )
    return ParityRecord(
        format=fmt, max_abs_diff=diff, samples=len(x), passed=True, tolerance=tolerance
    )


def export_model(
    model: nn.Module,
    inputs: torch.Tensor,
    out_dir: Path,
    cfg: ExportConfig,
    contract: InputContract | None = None,
) -> list[ParityRecord]:
    """Write every format of ``cfg.formats`` into ``out_dir`` (each as its exporter's
    ``file``) and check its parity. With ``contract``, each format that can carry metadata
    (its exporter's ``embed``) gets it written in before the check.

    Exports are made from a CPU float32 eval-mode view of the model (a deep copy when the model
    lives on another device), so the artifacts are portable and the caller's model keeps its
    device and training flag. The export example is two real samples (batch 2: a batch of one
    lets exporters specialise the batch dimension); parity then runs on
    ``inputs[:cfg.parity_samples]`` in batches of up to 32.

    Returns one passing ``ParityRecord`` per format, in ``cfg.formats`` order. Raises
    ``ExportError`` when an exporter fails, ``ExportParityError`` when an artifact disagrees
    with the eager model by more than ``cfg.parity_tolerance``, ``InvalidConfigError`` for an
    unregistered format (before anything is written).
    """
    if len(inputs) == 0:
        raise ValueError("export_model needs at least one real input sample")
    formats = [get_exporter(name) for name in dict.fromkeys(cfg.formats)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = inputs.detach().to("cpu", torch.float32)
    example = x[:2] if len(x) >= 2 else torch.cat([x, x], dim=0)
    parity_inputs = x[: cfg.parity_samples]
    records: list[ParityRecord] = []
    with cpu_eval(model) as cpu_model:
        for exporter in formats:
            path = out_dir / exporter.file
            exporter.export(cpu_model, example, path, cfg)
            if contract is not None and exporter.embed is not None:
                exporter.embed(path, contract)
            records.append(
                check_parity(
                    exporter.name,
                    path,
                    cpu_model,
                    parity_inputs,
                    cfg.parity_atol,
                    cfg.parity_rtol,
                )
            )
    return records


__all__ = ["check_parity", "export_model"]
