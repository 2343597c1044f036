"""The ``l1`` criterion: weight magnitude, torch-pruning's ``GroupMagnitudeImportance(p=1)``
over every layer of a coupled group; for a head, the L1 norm of every weight it owns (its
Q/K/V rows and output-projection columns). A baseline for the benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flow_compress.criteria import Criterion, ScoreRequest, register_criterion
from flow_compress.criteria._stock import stock_scores

if TYPE_CHECKING:
    import torch
    from torch import nn


def _head_l1(layer: nn.Module) -> torch.Tensor:
    from flow_compress.arch import attention

    weights = attention.head_weight_slices(layer)
    return sum(w.detach().float().abs().sum(dim=1) for w in weights).cpu()  # type: ignore[union-attr]


def score(request: ScoreRequest) -> list[torch.Tensor]:
    return stock_scores(request, "l1", _head_l1)


register_criterion(
    Criterion(
        name="l1",
        description="L1 weight magnitude (torch-pruning's GroupMagnitudeImportance, p=1)",
        score=score,
    )
)
