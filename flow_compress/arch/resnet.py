"""ResNet: torchvision's and timm's Basic/Bottleneck residual blocks.

Stage 1 prunes conv groups; channels coupled through the residual adds (a whole stage's
block outputs) are one group. Stage 2: a block without downsample → identity, with F(x) the
output of its last BN (or of timm's squeeze-excitation after it); a block with downsample →
its projection shortcut followed by the block's ReLU (``Identity*``) when
``truncate.allow_projection``. Trap: torchvision reuses one ReLU module per block, so
activations are observed on the BN with the ReLU applied in the hook (``flow_compress.graph``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flow_compress.arch import (
    BlockRule,
    Family,
    Kind,
    register_family,
    timm_models,
    torchvision_models,
)

if TYPE_CHECKING:
    from torch import nn


def _torchvision_match(m: nn.Module) -> tuple[Kind, str | None] | None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(m, BasicBlock | Bottleneck):
        branch = "bn2" if isinstance(m, BasicBlock) else "bn3"
        return ("identity", branch) if m.downsample is None else ("projection", None)
    return None


def _timm_types() -> tuple[type[nn.Module], ...]:
    try:
        from timm.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # timm is optional for torchvision-only users
        return ()
    return (BasicBlock, Bottleneck)


def _timm_match(m: nn.Module) -> tuple[Kind, str | None] | None:
    types = _timm_types()
    if not types or not isinstance(m, types):
        return None
    if m.downsample is not None:
        return ("projection", None)
    # F(x) is the output of the last BN, or of the squeeze-excitation that follows it.
    last_bn = "bn2" if isinstance(m, types[0]) else "bn3"
    return ("identity", "se" if m.se is not None else last_bn)


def _projection(m: nn.Module) -> nn.Module:
    from torch import nn

    from flow_compress.arch.blocks import ProjectionShortcut

    assert m.downsample is not None
    return ProjectionShortcut(m.downsample, nn.ReLU(inplace=False))


register_family(
    Family(
        name="resnet",
        architectures=(
            *torchvision_models("resnet", "resnet18", "resnet34", "resnet50", "resnet101"),
            *timm_models("resnet", timm_resnet50="resnet50"),
        ),
        small="resnet18",
        paper="resnet50",
        block_rules=(
            BlockRule("torchvision-resnet", _torchvision_match, _projection),
            BlockRule("timm-resnet", _timm_match, _projection),
        ),
    )
)
