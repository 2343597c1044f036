"""Architecture registry: names -> builders (torchvision or timm).

Torch-free at import time (torch, torchvision and timm are imported inside the builders), so
the HTTP layer can validate architecture names without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flow_compress.errors import UnsupportedModelError

if TYPE_CHECKING:
    from torch import nn

Builder = Callable[[int, int, int, bool], "nn.Module"]


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture: ``build(num_classes, in_chans, input_size, pretrained)``."""

    name: str
    family: str
    source: str
    default_input_size: int
    build: Builder


_REGISTRY: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> ArchSpec:
    """Add an architecture; a duplicate name is a programming error and raises ``ValueError``."""
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown architecture {name!r}; registered: {', '.join(list_architectures())}"
        ) from None


def _torchvision(name: str) -> Builder:
    def build(num_classes: int, in_chans: int, input_size: int, pretrained: bool) -> nn.Module:
        import torchvision

        from flow_compress.models import adapt_in_chans, replace_head

        if pretrained:
            # Real download path for users; weights come for 1000 classes, then the head is
            # replaced. Offline machines raise a clear error from torchvision's hub.
            model = torchvision.models.get_model(name, weights="DEFAULT")
            replace_head(model, num_classes)
        else:
            kwargs: dict[str, object] = {"weights": None, "num_classes": num_classes}
            if name.startswith("vit_"):
                kwargs["image_size"] = input_size
            model = torchvision.models.get_model(name, **kwargs)
        return adapt_in_chans(model, in_chans)

    return build


def _timm(name: str) -> Builder:
    def build(num_classes: int, in_chans: int, input_size: int, pretrained: bool) -> nn.Module:
        import timm

        kwargs: dict[str, object] = {}
        if "vit" in name or "deit" in name:
            kwargs["img_size"] = input_size
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        )

    return build


_TORCHVISION = {
    "resnet": ["resnet18", "resnet34", "resnet50", "resnet101"],
    "vgg": ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"],
    "mobilenet": ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"],
    "efficientnet": [f"efficientnet_b{i}" for i in range(5)],
    "densenet": ["densenet121", "densenet169"],
    "convnext": ["convnext_tiny", "convnext_small"],
    "shufflenet": ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x2_0"],
    "vit": ["vit_b_16"],
}
_TIMM = {
    "vit": ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"],
    "resnet": ["timm_resnet50"],
}

for _family, _names in _TORCHVISION.items():
    for _name in _names:
        register_architecture(ArchSpec(_name, _family, "torchvision", 224, _torchvision(_name)))
for _family, _names in _TIMM.items():
    for _name in _names:
        _timm_name = _name.removeprefix("timm_")
        register_architecture(ArchSpec(_name, _family, "timm", 224, _timm(_timm_name)))
