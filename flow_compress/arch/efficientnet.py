"""EfficientNet: MBConv and FusedMBConv blocks (inverted residuals with SiLU and SE).

Stage 1 prunes the expansion width (the depthwise conv and the SE reduce/expand follow it
through DepGraph). Stage 2: blocks with a residual connection → identity, F(x) being the
``block`` branch (stochastic depth is inactive in eval mode).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flow_compress.arch import BlockRule, Family, Kind, register_family, torchvision_models

if TYPE_CHECKING:
    from torch import nn


def _match(m: nn.Module) -> tuple[Kind, str | None] | None:
    from torchvision.models import efficientnet

    if isinstance(m, efficientnet.MBConv | efficientnet.FusedMBConv):
        return ("identity", "block") if m.use_res_connect else None
    return None


register_family(
    Family(
        name="efficientnet",
        architectures=torchvision_models("efficientnet", *(f"efficientnet_b{i}" for i in range(5))),
        small="efficientnet_b0",
        paper="efficientnet_b4",
        block_rules=(BlockRule("efficientnet-mbconv", _match),),
    )
)
