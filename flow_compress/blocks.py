"""Stage-2 candidates: blocks that can be replaced by an identity or a projection shortcut.

A rule looks at one module and says whether it is a candidate, what replaces it, and which
submodule's output is its residual branch F(x) (None: F(x) is taken as ``block(x) - x``).
Identity candidates must map their input shape to the same output shape on a real input;
the check runs on every model, so a rule cannot silently break a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Kind = Literal["identity", "projection"]


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: Kind
    branch: str | None


@dataclass(frozen=True)
class BlockRule:
    """``match(module) -> (kind, branch) | None``; ``projection(module)`` builds the shortcut."""

    name: str
    match: Callable[[nn.Module], tuple[Kind, str | None] | None]
    projection: Callable[[nn.Module], nn.Module] | None = None


_RULES: list[BlockRule] = []


def register_block_rule(rule: BlockRule) -> BlockRule:
    if any(r.name == rule.name for r in _RULES):
        raise ValueError(f"block rule {rule.name!r} is already registered")
    _RULES.append(rule)
    return rule


class ProjectionShortcut(nn.Module):
    """The block's own projection shortcut followed by its output activation (``Identity*``)."""

    def __init__(self, shortcut: nn.Module, activation: nn.Module | None) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.activation = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.shortcut(x))


def _torchvision_resnet_match(m: nn.Module) -> tuple[Kind, str | None] | None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(m, BasicBlock | Bottleneck):
        branch = "bn2" if isinstance(m, BasicBlock) else "bn3"
        return ("identity", branch) if m.downsample is None else ("projection", None)
    return None


def _torchvision_resnet_projection(m: nn.Module) -> nn.Module:
    assert m.downsample is not None
    return ProjectionShortcut(m.downsample, nn.ReLU(inplace=False))


register_block_rule(
    BlockRule("torchvision-resnet", _torchvision_resnet_match, _torchvision_resnet_projection)
)


def find_candidates(
    model: nn.Module, example: torch.Tensor, *, allow_projection: bool
) -> list[Candidate]:
    """Candidates in model order. Identity candidates are kept only if shapes really match."""
    found: list[Candidate] = []
    for name, module in model.named_modules():
        for rule in _RULES:
            hit = rule.match(module)
            if hit is None:
                continue
            kind, branch = hit
            if kind == "projection" and (not allow_projection or rule.projection is None):
                break
            found.append(Candidate(name, kind, branch))
            break
    if not found:
        return found
    shapes = _io_shapes(model, example, [c.name for c in found])
    return [
        c
        for c in found
        if c.name in shapes and (c.kind == "projection" or shapes[c.name][0] == shapes[c.name][1])
    ]


def _io_shapes(
    model: nn.Module, example: torch.Tensor, names: list[str]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    modules = dict(model.named_modules())

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            shapes[name] = (tuple(args[0].shape), tuple(out.shape))

        return fn

    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(hook(n)))
        with torch.no_grad():
            model.eval()
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return shapes


def make_replacement(block: nn.Module, kind: Kind) -> nn.Module:
    if kind == "identity":
        return nn.Identity()
    for rule in _RULES:
        if rule.match(block) is not None and rule.projection is not None:
            return rule.projection(block)
    raise ValueError(f"no projection rule for {type(block).__name__}")


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, nn.Sequential | nn.ModuleList) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
