"""Module surgery: put a module at a path, resize the stem and the classifier, slice linear
layers. Plain torch, nothing of this package: every other layer builds on it.

Failures are ``LookupError`` (the layer to operate on does not exist) or ``TypeError`` (it
exists but is of a type the operation cannot slice); callers that face users turn them into
typed errors.
"""

from __future__ import annotations

import torch
from torch import nn


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``path`` of ``model`` (indices of Sequential/ModuleList too)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, nn.Sequential | nn.ModuleList) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None


def adapt_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Swap the stem convolution for one taking ``in_chans`` channels.

    Pretrained RGB kernels are folded (mean over RGB, repeated) so a grey model starts from
    the same response to luminance; random kernels are simply re-initialised. Raises
    ``LookupError`` when the model has no ``Conv2d``.
    """
    found = _first_conv(model)
    if found is None:
        raise LookupError("model has no Conv2d stem to adapt to in_chans")
    path, conv = found
    if conv.in_channels == in_chans:
        return model
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        conv.dilation,  # type: ignore[arg-type]
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    with torch.no_grad():
        mean = conv.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.repeat(1, in_chans, 1, 1) * (conv.in_channels / in_chans))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    replace_module(model, path, new)
    return model


def classifier_path(model: nn.Module) -> str:
    """Module path of the classifier, whose outputs are never pruned: the last
    ``nn.Linear``, or, in a model without one, the last ``nn.Conv2d`` (a 1×1-conv head, as in
    DLA and SqueezeNet); ``LookupError`` when there is neither."""
    last_linear = last_conv = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_linear = name
        elif isinstance(module, nn.Conv2d):
            last_conv = name
    last = last_linear if last_linear is not None else last_conv
    if last is None:
        raise LookupError("no Linear or Conv2d classifier found")
    return last


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Replace the classifier (``classifier_path``) by one with ``num_classes`` outputs (a
    conv head keeps its kernel, stride and padding)."""
    path = classifier_path(model)
    head = model.get_submodule(path)
    if isinstance(head, nn.Linear):
        if head.out_features != num_classes:
            replace_module(model, path, nn.Linear(head.in_features, num_classes))
        return
    assert isinstance(head, nn.Conv2d)
    if head.out_channels != num_classes:
        new = nn.Conv2d(
            head.in_channels,
            num_classes,
            head.kernel_size,  # type: ignore[arg-type]
            head.stride,  # type: ignore[arg-type]
            head.padding,  # type: ignore[arg-type]
            bias=head.bias is not None,
        )
        replace_module(model, path, new)


def slice_linear_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    """Keep output units ``rows`` of ``lin`` (weight rows and bias)."""
    lin.weight = nn.Parameter(lin.weight.data[rows].clone(), lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[rows].clone(), lin.bias.requires_grad)
    lin.out_features = len(rows)


def slice_linear_cols(lin: nn.Linear, cols: torch.Tensor) -> None:
    """Keep input features ``cols`` of ``lin``."""
    lin.weight = nn.Parameter(lin.weight.data[:, cols].clone(), lin.weight.requires_grad)
    lin.in_features = len(cols)


def slice_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    """Keep features ``keep`` of a ``LayerNorm`` (an ``Identity`` has none to slice);
    ``TypeError`` for any other normalisation."""
    if isinstance(norm, nn.LayerNorm):
        if norm.weight is not None:
            norm.weight = nn.Parameter(norm.weight.data[keep].clone())
        if norm.bias is not None:
            norm.bias = nn.Parameter(norm.bias.data[keep].clone())
        norm.normalized_shape = (len(keep),)
    elif not isinstance(norm, nn.Identity):
        raise TypeError(f"normalisation of type {type(norm).__name__} cannot be sliced")


__all__ = [
    "adapt_in_chans",
    "classifier_path",
    "replace_head",
    "replace_module",
    "slice_linear_cols",
    "slice_linear_rows",
    "slice_norm",
]
