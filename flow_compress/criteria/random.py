"""The ``random`` criterion: uniform random scores (torch-pruning's ``RandomImportance``; for
heads, ``torch.rand``), drawn from torch's global generator, which the run's seed fixes. The
floor every other criterion must beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flow_compress.criteria import Criterion, ScoreRequest, register_criterion
from flow_compress.criteria._stock import stock_scores

if TYPE_CHECKING:
    import torch
    from torch import nn


def _head_random(layer: nn.Module) -> torch.Tensor:
    import torch

    from flow_compress.arch import attention

    heads, _, _ = attention.geometry(layer)
    return torch.rand(heads)


def score(request: ScoreRequest) -> list[torch.Tensor]:
    return stock_scores(request, "random", _head_random)


register_criterion(
    Criterion(
        name="random",
        description="uniform random scores (torch-pruning's RandomImportance)",
        score=score,
    )
)
