"""VGG with batch norm.

Stage 1 prunes conv groups; the flatten couples the last conv's channels to the first
classifier Linear's input features (×7×7), which DepGraph maps. Stage 2: a 3×3, stride-1 conv
with as many input as output channels, with its BN and ReLU → identity (one candidate spanning
the three layers). Stage 1 usually makes neighbouring widths differ, so after filter pruning
only convs whose widths still match remain candidates (``stage2="unpruned"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flow_compress.arch import (
    BlockRule,
    Candidate,
    Family,
    register_family,
    torchvision_models,
)

if TYPE_CHECKING:
    from torch import nn


def _scan(path: str, m: nn.Module) -> list[Candidate]:
    from torch import nn
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


register_family(
    Family(
        name="vgg",
        architectures=torchvision_models("vgg", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"),
        small="vgg11_bn",
        paper="vgg19_bn",
        block_rules=(BlockRule("vgg-equal-width-conv", scan=_scan),),
        stage2="unpruned",
    )
)
