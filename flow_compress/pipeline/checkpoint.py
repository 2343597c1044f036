"""Resumable compression: a checkpoint after every accepted step.

A compression can run for hours; a crash (a killed process, a lost machine) must not throw
the accepted steps away. With a checkpoint folder, the pipeline writes after every accepted
stage-1 step, at the end of stage 1, and after every stage-2 acceptance:

- ``weights-<n>.safetensors``: the student's weights at that point (no pickle);
- ``state.json``: the position (stage, step), the plan operations so far (``plan.py`` replays
  them on a freshly built model), the step records, notes, recovery counters, the original
  channel widths stage 1 caps against, how many training batches recovery has drawn, the RNG
  states, and the name and sha256 of the weights file.

Writes are atomic and ordered: the weights file is written first under a new name, then
``state.json`` is replaced atomically, then older weights files are removed. A crash at any
point leaves either the previous checkpoint or the new one, never a mix.

On start, ``Checkpointer.load`` returns the checkpoint only if it is complete, matches this
run's fingerprint (the configuration and the base weights' sha256) and its weights' sha256 is
right; anything else is ignored with a note in the report and the run starts from step 0.
Resuming restores the RNG states and fast-forwards the training batches, so on the same device
a resumed run takes the same decisions as an uninterrupted one.

The library never decides where checkpoints live or when they are deleted: the caller (the CLI
user, the worker) passes a folder and removes it once the artifacts are safe.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from flow_compress.arch.models import read_state_dict, save_weights
from flow_compress.artifacts import atomic_write_text, sha256_file
from flow_compress.config import CompressionConfig
from flow_compress.pipeline.context import Context
from flow_compress.plan import apply_ops
from flow_compress.schema import Stage, StepRecord

STATE_FILE = "state.json"
VERSION = 1
CheckpointStage = Literal[Stage.FILTER_PRUNE, Stage.LAYER_TRUNC]


class CheckpointState(BaseModel):
    """``state.json``. ``step`` counts accepted steps of ``stage`` (stage 1: steps of the
    schedule done; stage 2: blocks removed); ``("Layer Trunc", 0)`` marks the end of stage 1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = VERSION
    fingerprint: str
    stage: CheckpointStage
    step: int = Field(..., ge=0)
    plan_ops: list[dict[str, Any]]
    steps: list[StepRecord]
    notes: list[str]
    recovery_iters: dict[str, int]
    original_widths: dict[str, int]
    base_val_top1: float
    train_batches_used: int = Field(..., ge=0)
    percent: float
    rng: dict[str, Any]
    weights_file: str = Field(..., pattern=r"^weights-\d+\.safetensors$")
    weights_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")


def fingerprint(config: CompressionConfig, weights_sha256: str | None) -> str:
    """What a checkpoint must match to be resumed: the whole configuration and the base
    weights. A changed option or other weights make the old steps meaningless."""
    digest = hashlib.sha256()
    digest.update(config.model_dump_json().encode())
    digest.update(b"\0")
    digest.update((weights_sha256 or "random-init").encode())
    return digest.hexdigest()


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],  # type: ignore[index,union-attr]
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [_bytes_tensor(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _bytes_tensor(encoded: str) -> torch.Tensor:
    raw = bytearray(base64.b64decode(encoded))
    return torch.frombuffer(raw, dtype=torch.uint8).clone()


class Checkpointer:
    """Writes and reads the checkpoints of one run in ``folder`` (created on first save)."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self._seq = 0

    # ------------------------------------------------------------ read

    def load(self) -> tuple[CheckpointState | None, str | None]:
        """The checkpoint to resume from, or None and why it was not usable (None, None when
        there is no checkpoint at all)."""
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None, None
        try:
            state = CheckpointState.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            return None, f"checkpoint ignored: unreadable state ({type(exc).__name__})"
        if state.version != VERSION or state.fingerprint != self.fingerprint:
            return None, "checkpoint ignored: it belongs to another configuration or weights"
        weights = self.folder / state.weights_file
        if not weights.is_file() or sha256_file(weights) != state.weights_sha256:
            return None, "checkpoint ignored: its weights file is missing or corrupt"
        self._seq = int(state.weights_file.split("-")[1].split(".")[0])
        return state, None

    def restore_model(
        self, model: nn.Module, state: CheckpointState, example: torch.Tensor
    ) -> nn.Module:
        """Replay the checkpoint's plan on ``model`` (a fresh copy of the original, changed in
        place) with the pipeline's ``example`` input and load the checkpoint's weights."""
        apply_ops(model, state.plan_ops, example)
        weights = read_state_dict(self.folder / state.weights_file)
        device = example.device
        model.load_state_dict(weights, strict=True)
        return model.to(device)

    # ------------------------------------------------------------ write

    def save(
        self,
        model: nn.Module,
        *,
        stage: CheckpointStage,
        step: int,
        plan_ops: list[dict[str, object]],
        steps: list[StepRecord],
        notes: list[str],
        recovery_iters: dict[str, int],
        original_widths: dict[str, int],
        base_val_top1: float,
        train_batches_used: int,
        percent: float,
    ) -> CheckpointState:
        """Write a checkpoint atomically (see the module docstring for the order)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"weights-{self._seq}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_weights(model, tmp)
        tmp.replace(self.folder / name)
        state = CheckpointState(
            fingerprint=self.fingerprint,
            stage=stage,
            step=step,
            plan_ops=[dict(op) for op in plan_ops],
            steps=list(steps),
            notes=list(notes),
            recovery_iters=dict(recovery_iters),
            original_widths=dict(original_widths),
            base_val_top1=base_val_top1,
            train_batches_used=train_batches_used,
            percent=percent,
            rng=_rng_state(),
            weights_file=name,
            weights_sha256=sha256_file(self.folder / name),
        )
        # json.dumps, not model_dump_json: plan ops may hold tuples that pydantic would keep.
        atomic_write_text(self.folder / STATE_FILE, json.dumps(state.model_dump(mode="json")))
        for old in self.folder.glob("weights-*.safetensors"):
            if old.name != name:
                with contextlib.suppress(OSError):
                    old.unlink()
        return state


def resume(checkpointer: Checkpointer, ctx: Context, student: nn.Module) -> nn.Module | None:
    """Load a usable checkpoint into ``ctx`` and return the student rebuilt from it, or None
    (start from step 0; the reason, if any, is added to ``ctx.notes``). ``ctx.resumed_from``
    then holds the checkpoint's state."""
    state, why_not = checkpointer.load()
    if state is None:
        if why_not:
            ctx.notes.append(why_not)
        return None
    try:
        # On a copy: a plan that fails half-way must not leave the fresh student pruned.
        model = checkpointer.restore_model(copy.deepcopy(student), state, ctx.example)
    except Exception as exc:  # any failure to apply means: start over, never a broken model
        ctx.notes.append(f"checkpoint ignored: it could not be applied ({type(exc).__name__})")
        return None
    ctx.steps[:] = state.steps
    ctx.plan_ops[:] = _renumber_graphs(state.plan_ops)
    ctx.notes[:] = [
        *state.notes,
        f"resumed from a checkpoint after {state.stage} step {state.step} "
        f"({len(state.steps)} step records; earlier work was done by an interrupted run, "
        "whose timings are not included)",
    ]
    ctx.recovery_iters.clear()
    ctx.recovery_iters.update(state.recovery_iters)
    ctx.original_widths.clear()
    ctx.original_widths.update(state.original_widths)
    ctx.base_val_top1 = state.base_val_top1
    ctx.train_batches_used = state.train_batches_used
    ctx.resumed_from = (state.stage, state.step)
    _set_rng_state(state.rng)
    total = (
        ctx.config.prune.steps
        if state.stage is Stage.FILTER_PRUNE
        else ctx.config.truncate.max_layers
    )
    ctx.emit(
        state.stage,
        state.step,
        total,
        macs=state.steps[-1].macs if state.steps else None,
        top1=state.steps[-1].top1 if state.steps else None,
        message=f"resumed from checkpoint ({state.stage} step {state.step})",
    )
    return model


def _renumber_graphs(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give the checkpoint's DepGraph ids negative numbers (in first-seen order).

    Plan replay starts a new graph whenever consecutive prune entries change ``graph``; the
    ids come from a per-process counter, so this process's next graphs could reuse an id of
    the interrupted process and merge two steps. Negative ids never collide with it.
    """
    mapping: dict[object, int] = {}
    out = []
    for op in ops:
        if "graph" in op:
            op = {**op, "graph": mapping.setdefault(op["graph"], -1 - len(mapping))}
        out.append(op)
    return out


def attach(checkpointer: Checkpointer, ctx: Context) -> None:
    """Write a checkpoint whenever a stage accepts a step (``Context.accepted``)."""

    def save(model: nn.Module, stage: Stage, step: int) -> None:
        checkpointer.save(
            model,
            stage=Stage.LAYER_TRUNC if stage is Stage.LAYER_TRUNC else Stage.FILTER_PRUNE,
            step=step,
            plan_ops=ctx.plan_ops,
            steps=ctx.steps,
            notes=ctx.notes,
            recovery_iters=dict(ctx.recovery_iters),
            original_widths=ctx.original_widths,
            base_val_top1=ctx.base_val_top1,
            train_batches_used=ctx.train_batches_used,
            percent=ctx.percent,
        )

    ctx.accept_fn = save


__all__ = ["CheckpointState", "Checkpointer", "attach", "fingerprint", "resume"]
