"""The ``torchscript`` format: ``model.ts``, a TorchScript archive, timed by the
``torchscript`` runtime (the reloaded archive on the job's device).

A trace is preferred (it records exactly the ops that ran) and kept only if it reproduces the
eager outputs on another batch; scripting is the fallback (see ``export_torchscript``).

torch is imported where it is used, so that registering the format stays torch-free
(``flow_compress.export``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from flow_compress.errors import ExportError
from flow_compress.export import Exporter, register_exporter

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import nn

    from flow_compress.config import ExportConfig
    from flow_compress.contract import InputContract
    from flow_compress.measure.latency import Engine


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, bool]:
    """Trace ``model``; the flag says whether the tracer warned about Python control flow."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # check_trace compares graphs of two invocations and rejects models whose graphs are
        # merely renamed (torchvision's ViT); faithfulness is checked on outputs instead.
        traced = torch.jit.trace(model, example, check_trace=False)
    suspicious = any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
    return traced, suspicious


def _script(model: nn.Module) -> torch.jit.ScriptModule:
    import torch

    from flow_compress.export._common import quiet_jit

    with quiet_jit():
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
    import torch

    from flow_compress.export._common import (
        cause,
        eval_mode,
        logits_of,
        outputs_match,
        quiet_jit,
        staging,
        verification_batch,
    )

    path = Path(path)
    check = verification_batch(example)
    with eval_mode(model), torch.no_grad():
        reference = logits_of(model(check), "torchscript")
        problems: list[str] = []
        fallback: torch.jit.ScriptModule | None = None
        chosen: torch.jit.ScriptModule | None = None
        try:
            traced, suspicious = _trace(model, example)
            faithful = outputs_match(logits_of(traced(check), "torchscript"), reference)
        except Exception as exc:
            problems.append(f"tracing failed ({cause(exc)})")
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
                faithful = outputs_match(logits_of(scripted(check), "torchscript"), reference)
            except Exception as exc:
                problems.append(f"scripting failed ({cause(exc)})")
            else:
                if faithful:
                    chosen = scripted
                else:
                    problems.append("the scripted module does not reproduce the eager outputs")
        chosen = chosen or fallback
    if chosen is None:
        raise ExportError("torchscript export failed: " + "; ".join(problems))
    with staging(path) as folder:
        staged = folder / path.name
        try:
            with quiet_jit():
                torch.jit.save(chosen, str(staged))
        except Exception as exc:
            raise ExportError(f"torchscript export failed: saving failed ({cause(exc)})") from exc
        staged.replace(path)


def _export(model: nn.Module, example: torch.Tensor, path: Path, cfg: ExportConfig) -> None:
    export_torchscript(model, example, path)


def embed_contract(path: Path, contract: InputContract) -> None:
    """Re-save the archive with the contract as the extra file ``preprocessing.json``
    (``torch.jit.load(path, _extra_files={"preprocessing.json": ""})`` reads it back)."""
    import torch

    from flow_compress.contract import CONTRACT_FILE
    from flow_compress.export._common import cause, quiet_jit, staging

    path = Path(path)
    try:
        with quiet_jit():
            loaded = torch.jit.load(str(path), map_location="cpu")
        with staging(path) as folder:
            staged = folder / path.name
            with quiet_jit():
                torch.jit.save(
                    loaded, str(staged), _extra_files={CONTRACT_FILE: contract.to_json()}
                )
            staged.replace(path)
    except Exception as exc:
        raise ExportError(
            f"torchscript export failed: embedding the contract ({cause(exc)})"
        ) from exc


def read_contract_file(path: Path) -> str | None:
    """The archive's ``preprocessing.json`` extra file as text (None when absent)."""
    import torch

    from flow_compress.contract import CONTRACT_FILE
    from flow_compress.export._common import quiet_jit

    extra = {CONTRACT_FILE: ""}
    with quiet_jit():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    text: str | bytes = extra[CONTRACT_FILE]
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return text or None


def load(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The archive reloaded on the CPU (``torch.jit.load``), as batch → float32 logits."""
    import torch

    from flow_compress.export._common import cause, logits_of, quiet_jit

    try:
        with quiet_jit():
            loaded = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ExportError(
            f"torchscript artifact {Path(path).name} cannot be loaded ({cause(exc)})"
        ) from exc
    loaded.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return logits_of(loaded(x), "torchscript").float()

    return run


def engine(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
    work_dir: Path,
    name: str,
    threads: int | None,
) -> Engine:
    """``model`` (on ``device``, eval mode) traced on ``device`` into ``work_dir/<name>.ts``;
    the reloaded archive is timed, as a deployment would run it."""
    import torch

    from flow_compress.export._common import quiet_jit
    from flow_compress.measure.latency import random_input, torch_engine

    path = Path(work_dir) / f"{name}.ts"
    export_torchscript(model, random_input(2, input_shape, device), path)
    with quiet_jit():
        loaded = torch.jit.load(str(path), map_location=device)
    loaded.eval()
    return torch_engine("torchscript", loaded, input_shape, device)


register_exporter(
    Exporter(
        name="torchscript",
        file="model.ts",
        label="TorchScript",
        export=_export,
        load=load,
        runtime="torchscript",
        runtime_label="TorchScript",
        engine=engine,
        embed=embed_contract,
    )
)
