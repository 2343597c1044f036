"""Stage-1 importance criteria: how every prunable unit (channel, neuron, head) is scored.

A criterion is a ``Criterion``: a name (what ``prune.criterion`` says), a one-line
description, and ``score(request) -> one tensor per group`` (higher = keep). Stage 1 runs
the same schedule, caps, ranking, recovery and budget whatever the criterion, so criteria
differ in the score alone (docs/algorithm.md, "Criteria").

Built in: ``divergence`` (IDAP++'s flow divergence δ), and torch-pruning's ``l1``,
``taylor`` and ``random`` as baselines. Each lives in its own module, which registers it with
``register_criterion`` and is imported below. Importing them needs no torch (their score
functions import what they use when they run), so the HTTP layer can validate
``prune.criterion`` against this registry.

Adding a criterion: write ``flow_compress/criteria/<name>.py`` with its
``register_criterion(...)`` call and import it here (README, "Extending flow-compress").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flow_compress._registry import Registry
from flow_compress.errors import InvalidConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from flow_compress.config import PruneConfig
    from flow_compress.data import Batch
    from flow_compress.graph import PrunableGroup, PruningGraph


@dataclass(frozen=True)
class ScoreRequest:
    """What a criterion scores: ``groups`` of ``graph`` (traced on ``model``), with
    ``batches`` (calibration batches of the validation split, never the test split) and the
    stage's options. A criterion may run the model (forward, backward) but must not change its
    weights or training mode, must remove every hook it installs, and clears the gradients
    it computes."""

    model: nn.Module
    graph: PruningGraph
    groups: list[PrunableGroup]
    batches: list[Batch]
    device: torch.device
    options: PruneConfig


@dataclass(frozen=True)
class Criterion:
    """``score(request)`` returns one float tensor per group of ``request.groups``, in order,
    with one score per root unit (``group.size``); higher means keep."""

    name: str
    description: str
    score: Callable[[ScoreRequest], list[torch.Tensor]]


_CRITERIA: Registry[Criterion] = Registry("criterion", InvalidConfigError)


def register_criterion(criterion: Criterion) -> Criterion:
    """Register a criterion; a duplicate name raises ``ValueError``."""
    return _CRITERIA.register(criterion)


def unregister_criterion(name: str) -> Criterion:
    return _CRITERIA.unregister(name)


def get_criterion(name: str) -> Criterion:
    """The criterion ``name``; an unknown one raises ``InvalidConfigError`` listing the
    registered names."""
    return _CRITERIA.get(name)


def list_criteria() -> list[str]:
    return _CRITERIA.names()


def criteria() -> Iterator[Criterion]:
    return iter(_CRITERIA)


from flow_compress.criteria import (  # noqa: E402, F401  (each module registers its criterion)
    divergence,
    l1,
    random,
    taylor,
)

__all__ = [
    "Criterion",
    "ScoreRequest",
    "criteria",
    "get_criterion",
    "list_criteria",
    "register_criterion",
    "unregister_criterion",
]
