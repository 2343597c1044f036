"""What the baseline criteria share: torch-pruning's stock importance for channel groups (through
``flow_compress.graph``, the only torch-pruning importer), the criterion's own rule for
attention heads, which torch-pruning does not know."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from flow_compress.criteria import ScoreRequest


def stock_scores(
    request: ScoreRequest, name: str, head_score: Callable[[nn.Module], torch.Tensor]
) -> list[torch.Tensor]:
    """``graph.stock_importance(name, group)`` per channel group, ``head_score(layer)`` per
    head group. Gradients on the model are cleared afterwards (Taylor's own, or those the
    last recovery step left), so no criterion hands a model with gradients to the next step."""
    try:
        return [
            head_score(request.model.get_submodule(g.root_name))
            if g.unit == "head"
            else request.graph.stock_importance(name, g)
            for g in request.groups
        ]
    finally:
        request.model.zero_grad(set_to_none=True)
