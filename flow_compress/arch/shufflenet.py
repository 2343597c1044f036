"""ShuffleNetV2: units that split the channels, transform one half and shuffle them back.

torch-pruning 1.6 cannot trace the channel shuffle (ZeroDivisionError), so a unit is an opaque
block: channels that enter or leave it are never pruned, and only the *inner* width of its
``branch2`` (1×1 → depthwise → 1×1), which never crosses the shuffle, becomes a group.
``branch1`` (stride-2 units) is depthwise → 1×1 on the unit's input: every one of its channels
crosses the shuffle, so it has no internal width. Stage 2: a stride-1 unit's ``branch2`` →
identity (the unit still splits, concatenates and shuffles, so its shape is kept); stride-2
units change the shape and have no shortcut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flow_compress.arch import (
    BlockRule,
    Candidate,
    Family,
    OpaqueBlock,
    register_family,
    torchvision_models,
)

if TYPE_CHECKING:
    from torch import nn


def _is_unit(m: nn.Module) -> bool:
    from torchvision.models.shufflenetv2 import InvertedResidual

    # Exact type: a subclass may change the forward pass that makes branch2 internal.
    return type(m) is InvertedResidual


def _scan(path: str, m: nn.Module) -> list[Candidate]:
    if not _is_unit(m) or m.stride != 1:
        return []
    return [Candidate(f"{path}.branch2" if path else "branch2", "identity", None)]


register_family(
    Family(
        name="shufflenet",
        architectures=torchvision_models(
            "shufflenet", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x2_0"
        ),
        small="shufflenet_v2_x0_5",
        paper="shufflenet_v2_x2_0",
        block_rules=(BlockRule("shufflenet-v2-branch", scan=_scan),),
        opaque_blocks=(
            OpaqueBlock("torchvision-shufflenet-v2-unit", _is_unit, lambda m: ("branch2",)),
        ),
    )
)
