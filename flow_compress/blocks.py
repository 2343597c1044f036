"""Stage-2 candidates: blocks that can be replaced by an identity or a projection shortcut.

A rule either looks at one module (``match``) and says whether it is a candidate, what
replaces it, and which submodule's output is its residual branch F(x) (None: F(x) is taken as
``block(x) - x``), or scans a module (``scan``) and returns candidates inside it — a child
(ShuffleNetV2's ``branch2``) or a run of sibling layers (VGG's conv → BN → ReLU, whose extra
members are the candidate's ``span``). Identity candidates must map their input shape to the
same output shape on a real input; the check runs on every model, so a rule cannot silently
break a forward pass.

Candidates per family (ALGORITHM.md, "Stage 2" and "Architecture notes"):

- ResNet (torchvision, timm): Basic/Bottleneck blocks without downsample → identity; with
  downsample → their projection shortcut (``Identity*``) when projections are allowed.
- ViT (torchvision ``EncoderBlock``, timm ``Block``) and ConvNeXt (``CNBlock``): every
  encoder block → identity (their shapes never change).
- MobileNetV2/V3, EfficientNet (``InvertedResidual``, ``MBConv``, ``FusedMBConv``): blocks
  with a residual connection → identity. Blocks without one change the shape and have no
  projection shortcut to fall back on, so they are not candidates.
- VGG: a 3×3, stride-1 conv with as many input as output channels, with its BN and ReLU →
  identity. Stage 1 usually makes neighbouring widths differ, so after filter pruning only
  convs whose widths still match remain candidates.
- ShuffleNetV2: stride-1 units' ``branch2`` → identity (the unit still splits, concatenates
  and shuffles, so its shape is kept). Stride-2 units change the shape and have no shortcut.
- DenseNet: none. Removing a dense layer removes its growth channels from every later
  concatenation, which is a change to all later layers' inputs (stage 1 prunes growth
  channels instead, through DepGraph's concat mapping); a dense layer's output never matches
  its input shape, so no identity replacement exists.
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
    """``name`` is replaced by the ``kind`` replacement; every path in ``span`` (siblings that
    follow it) is replaced by an identity with it."""

    name: str
    kind: Kind
    branch: str | None
    span: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.name, *self.span)


@dataclass(frozen=True)
class BlockRule:
    """``match(module) -> (kind, branch) | None``; ``projection(module)`` builds the shortcut;
    or ``scan(path, module) -> candidates`` for candidates inside ``module``."""

    name: str
    match: Callable[[nn.Module], tuple[Kind, str | None] | None] | None = None
    projection: Callable[[nn.Module], nn.Module] | None = None
    scan: Callable[[str, nn.Module], list[Candidate]] | None = None


_RULES: list[BlockRule] = []


def register_block_rule(rule: BlockRule) -> BlockRule:
    if any(r.name == rule.name for r in _RULES):
        raise ValueError(f"block rule {rule.name!r} is already registered")
    if (rule.match is None) == (rule.scan is None):
        raise ValueError(f"block rule {rule.name!r} needs exactly one of match and scan")
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


# --------------------------------------------------------------------------- ResNet


def _torchvision_resnet_match(m: nn.Module) -> tuple[Kind, str | None] | None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(m, BasicBlock | Bottleneck):
        branch = "bn2" if isinstance(m, BasicBlock) else "bn3"
        return ("identity", branch) if m.downsample is None else ("projection", None)
    return None


def _torchvision_resnet_projection(m: nn.Module) -> nn.Module:
    assert m.downsample is not None
    return ProjectionShortcut(m.downsample, nn.ReLU(inplace=False))


def _timm_resnet_types() -> tuple[type[nn.Module], ...]:
    try:
        from timm.models.resnet import BasicBlock, Bottleneck
    except ImportError:
        return ()
    return (BasicBlock, Bottleneck)


def _timm_resnet_match(m: nn.Module) -> tuple[Kind, str | None] | None:
    types = _timm_resnet_types()
    if not types or not isinstance(m, types):
        return None
    if m.downsample is not None:
        return ("projection", None)
    # F(x) is the output of the last BN, or of the squeeze-excitation that follows it.
    last_bn = "bn2" if isinstance(m, types[0]) else "bn3"
    return ("identity", "se" if m.se is not None else last_bn)


def _timm_resnet_projection(m: nn.Module) -> nn.Module:
    assert m.downsample is not None
    return ProjectionShortcut(m.downsample, nn.ReLU(inplace=False))


# --------------------------------------------------------------------------- transformers


def _encoder_block_match(m: nn.Module) -> tuple[Kind, str | None] | None:
    from torchvision.models.convnext import CNBlock
    from torchvision.models.vision_transformer import EncoderBlock

    if isinstance(m, EncoderBlock | CNBlock):
        return ("identity", None)
    try:
        from timm.models.vision_transformer import Block
    except ImportError:
        return None
    return ("identity", None) if type(m) is Block else None


# --------------------------------------------------------------------------- inverted residuals


def _inverted_residual_match(m: nn.Module) -> tuple[Kind, str | None] | None:
    from torchvision.models import efficientnet, mobilenetv2, mobilenetv3

    if isinstance(m, mobilenetv2.InvertedResidual):
        return ("identity", "conv") if m.use_res_connect else None
    if isinstance(m, mobilenetv3.InvertedResidual | efficientnet.MBConv | efficientnet.FusedMBConv):
        return ("identity", "block") if m.use_res_connect else None
    return None


# --------------------------------------------------------------------------- scans


def _vgg_scan(path: str, m: nn.Module) -> list[Candidate]:
    from torchvision.models.vgg import VGG

    if not isinstance(m, VGG):
        return []
    layers = list(m.features)
    prefix = f"{path}.features" if path else "features"
    found = []
    for i in range(len(layers) - 2):
        conv, bn, act = layers[i : i + 3]
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(bn, nn.BatchNorm2d)
            and isinstance(act, nn.ReLU)
            and conv.in_channels == conv.out_channels
            and conv.groups == 1
            and conv.stride == (1, 1)
            and conv.kernel_size == (3, 3)
        ):
            found.append(
                Candidate(
                    f"{prefix}.{i}", "identity", None, (f"{prefix}.{i + 1}", f"{prefix}.{i + 2}")
                )
            )
    return found


def _shufflenet_scan(path: str, m: nn.Module) -> list[Candidate]:
    from torchvision.models.shufflenetv2 import InvertedResidual

    if type(m) is not InvertedResidual or m.stride != 1:
        return []
    return [Candidate(f"{path}.branch2" if path else "branch2", "identity", None)]


register_block_rule(
    BlockRule("torchvision-resnet", _torchvision_resnet_match, _torchvision_resnet_projection)
)
register_block_rule(BlockRule("timm-resnet", _timm_resnet_match, _timm_resnet_projection))
register_block_rule(BlockRule("encoder-block", _encoder_block_match))
register_block_rule(BlockRule("inverted-residual", _inverted_residual_match))
register_block_rule(BlockRule("vgg-equal-width-conv", scan=_vgg_scan))
register_block_rule(BlockRule("shufflenet-v2-branch", scan=_shufflenet_scan))


# --------------------------------------------------------------------------- discovery


def find_candidates(
    model: nn.Module, example: torch.Tensor, *, allow_projection: bool
) -> list[Candidate]:
    """Candidates in model order. Identity candidates are kept only if shapes really match
    (input of the candidate against output of its last span member)."""
    found: list[Candidate] = []
    for name, module in model.named_modules():
        for rule in _RULES:
            if rule.scan is not None:
                found.extend(rule.scan(name, module))
                continue
            assert rule.match is not None
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
    shapes = _io_shapes(model, example, [(c.name, c.paths[-1]) for c in found])
    return [
        c
        for c in found
        if c.name in shapes and (c.kind == "projection" or shapes[c.name][0] == shapes[c.name][1])
    ]


def _io_shapes(
    model: nn.Module, example: torch.Tensor, spans: list[tuple[str, str]]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input shape of each span's first module and output shape of its last, keyed by the
    first."""
    inputs: dict[str, tuple[int, ...]] = {}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    modules = dict(model.named_modules())

    def pre(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inputs[name] = tuple(args[0].shape)

        return fn

    def post(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, _args: object, out: torch.Tensor) -> None:
            if name in inputs:
                shapes[name] = (inputs[name], tuple(out.shape))

        return fn

    try:
        for first, last in spans:
            handles.append(modules[first].register_forward_pre_hook(pre(first)))
            handles.append(modules[last].register_forward_hook(post(first)))
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
        if rule.match is None or rule.projection is None:
            continue
        if rule.match(block) is not None:
            return rule.projection(block)
    raise ValueError(f"no projection rule for {type(block).__name__}")
