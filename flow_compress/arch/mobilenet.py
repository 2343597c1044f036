"""MobileNetV2 and V3: inverted residuals (pointwise → depthwise → [SE] → projection).

Stage 1 prunes the expansion width: the depthwise conv couples to its producer and SE's
reduce/expand stay consistent through DepGraph; hardswish is recognised as the activation
that follows. Stage 2: blocks with a residual connection → identity (F(x) is the block's
``conv``/``block`` branch). Blocks without one change the shape and have no projection
shortcut to fall back on, so they are not candidates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flow_compress.arch import BlockRule, Family, Kind, register_family, torchvision_models

if TYPE_CHECKING:
    from torch import nn


def _match(m: nn.Module) -> tuple[Kind, str | None] | None:
    from torchvision.models import mobilenetv2, mobilenetv3

    if isinstance(m, mobilenetv2.InvertedResidual):
        return ("identity", "conv") if m.use_res_connect else None
    if isinstance(m, mobilenetv3.InvertedResidual):
        return ("identity", "block") if m.use_res_connect else None
    return None


register_family(
    Family(
        name="mobilenet",
        architectures=torchvision_models(
            "mobilenet", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"
        ),
        small="mobilenet_v3_small",
        paper="mobilenet_v3_large",
        block_rules=(BlockRule("mobilenet-inverted-residual", _match),),
    )
)
