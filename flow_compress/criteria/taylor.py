"""The ``taylor`` criterion: first-order Taylor importance |w · ∂L/∂w|, torch-pruning's
``GroupTaylorImportance``, with the cross-entropy gradients of the calibration batches; for a
head, the same sum over every weight it owns. A baseline for the benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flow_compress.criteria import Criterion, ScoreRequest, register_criterion
from flow_compress.criteria._stock import stock_scores

if TYPE_CHECKING:
    import torch
    from torch import nn


def _head_taylor(layer: nn.Module) -> torch.Tensor:
    import torch

    from flow_compress.arch import attention

    heads, _, _ = attention.geometry(layer)
    weights = attention.head_weight_slices(layer)
    grads = attention.head_grad_slices(layer)
    total = torch.zeros(heads)
    for w, gr in zip(weights, grads, strict=True):
        if gr is not None:
            total += (w.detach().float() * gr.float()).abs().sum(dim=1).cpu()
    return total


def score(request: ScoreRequest) -> list[torch.Tensor]:
    """Accumulate the gradients of the calibration batches (eval mode: no dropout, frozen
    BN statistics), then score; the gradients are cleared afterwards."""
    from torch.nn import functional as F

    model, device = request.model, request.device
    model.zero_grad(set_to_none=True)
    model.eval()
    for x, y in request.batches:
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
    return stock_scores(request, "taylor", _head_taylor)


register_criterion(
    Criterion(
        name="taylor",
        description="first-order Taylor |w · dL/dw| on calibration batches "
        "(torch-pruning's GroupTaylorImportance)",
        score=score,
    )
)
