"""Plans: the JSON record that rebuilds a pruned architecture from the original one.

``plan.json`` lists, in order, ``prune`` operations (a group root and the root channel
indices removed, replayed through DepGraph) and ``replace`` operations (a block replaced by
an identity or its projection shortcut). Replaying a plan on a freshly built original model
and loading ``weights.safetensors`` reproduces the pruned model exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from flow_compress.arch.blocks import make_replacement
from flow_compress.arch.models import build_model, load_weights
from flow_compress.arch.surgery import replace_module
from flow_compress.errors import InvalidConfigError
from flow_compress.graph import replay_prune


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    model: str
    num_classes: int
    in_chans: int
    input_size: int
    ops: list[dict[str, Any]]


def apply_plan(model: nn.Module, plan: Plan, example: torch.Tensor) -> nn.Module:
    """Apply ``plan.ops`` in order to ``model`` (in place), returning it."""
    return apply_ops(model, plan.ops, example)


def apply_ops(model: nn.Module, ops: Sequence[dict[str, Any]], example: torch.Tensor) -> nn.Module:
    """Apply plan operations in order to ``model`` (in place), traced on ``example``; returns
    it. Unknown operations raise ``InvalidConfigError``."""
    pending: list[dict[str, Any]] = []
    for op in ops:
        kind = op.get("op")
        if kind == "prune":
            pending.append(op)
            continue
        replay_prune(model, example, pending)
        pending = []
        if kind != "replace":
            raise InvalidConfigError(f"unknown plan operation {kind!r}")
        name = str(op["module"])
        replace_module(model, name, make_replacement(model.get_submodule(name), op["with"]))
    replay_prune(model, example, pending)
    return model


def rebuild(plan: Plan, weights: str | Path | None = None) -> nn.Module:
    """Build the original architecture, replay the plan, and load the pruned weights."""
    model = build_model(
        plan.model, plan.num_classes, in_chans=plan.in_chans, input_size=plan.input_size
    )
    example = torch.zeros(1, plan.in_chans, plan.input_size, plan.input_size)
    apply_plan(model, plan, example)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def read_plan(path: str | Path) -> Plan:
    return Plan.model_validate(json.loads(Path(path).read_text()))


__all__ = ["Plan", "apply_ops", "apply_plan", "read_plan", "rebuild"]
