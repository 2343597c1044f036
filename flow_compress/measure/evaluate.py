"""Accuracy and the output-error guarantee on a split."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flow_compress.data import Batch


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Batch], device: torch.device
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent (top-5 is top-k with k = min(5, classes))."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hits = topk.eq(y.view(-1, 1))
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        return 0.0, 0.0
    return 100.0 * correct1 / total, 100.0 * correct5 / total


@torch.no_grad()
def relative_output_error(
    base: nn.Module, pruned: nn.Module, batches: Iterable[Batch], device: torch.device
) -> torch.Tensor:
    """Per-sample ||N0(x) - N*(x)||^2 / ||N0(x)||^2 on logits (the paper's bound, as a check)."""
    base.eval()
    pruned.eval()
    out = []
    for x, _ in batches:
        x = x.to(device)
        a, b = base(x).float(), pruned(x).float()
        out.append(((a - b).pow(2).sum(1) / a.pow(2).sum(1).clamp_min(1e-12)).cpu())
    return torch.cat(out) if out else torch.zeros(0)
