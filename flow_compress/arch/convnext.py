"""ConvNeXt (torchvision ``CNBlock``): depthwise 7×7 → channels-last LayerNorm → MLP, scaled
by a per-channel layer scale before the residual add.

Stage 1 prunes the MLP hidden width (pwconv1 → GELU → pwconv2) and the stage widths; the
layer scale γ (C×1×1) is declared so that it is pruned with its channel. Stage 2: every block
→ identity (its shape never changes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flow_compress.arch import (
    BlockRule,
    Family,
    Kind,
    LayerScale,
    register_family,
    torchvision_models,
)

if TYPE_CHECKING:
    from torch import nn


def _is_block(m: nn.Module) -> bool:
    from torchvision.models.convnext import CNBlock

    return isinstance(m, CNBlock)


def _match(m: nn.Module) -> tuple[Kind, str | None] | None:
    return ("identity", None) if _is_block(m) else None


register_family(
    Family(
        name="convnext",
        architectures=torchvision_models("convnext", "convnext_tiny", "convnext_small"),
        small="convnext_tiny",
        paper="convnext_small",
        block_rules=(BlockRule("convnext-block", _match),),
        # C×1×1, multiplies the block's NCHW output.
        layer_scales=(LayerScale("convnext-layer-scale", _is_block, lambda m: m.layer_scale),),
    )
)
