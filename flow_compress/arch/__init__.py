"""Architectures: what the library knows about each family, one module per family.

A family module (``resnet.py``, ``vit.py``, ...) declares a ``Family`` — the architecture
names it builds and where from, its stage-2 block rules, opaque blocks, layer-scale parameters,
attention layouts and extra activations — and registers it with ``register_family``. The
modules are imported at the bottom; importing them needs no torch (their callables import torch,
torchvision or timm when they run), so the HTTP layer can validate architecture names.

Adding a family: write ``flow_compress/arch/<family>.py`` with its ``register_family(...)``
call and import it here (README, "Extending flow-compress").

Machinery that reads the declarations: ``arch.surgery`` (module surgery, depends on nothing
of this package), ``arch.blocks`` (stage-2 candidates), ``arch.attention`` (heads),
``flow_compress.graph`` (DepGraph) and ``flow_compress.arch.models`` (building).
``arch.structure`` reads what no family declares from module types and traced graphs
(residual blocks, channel shuffles, layer scales): the declarations are the special cases.
"""

from __future__ import annotations

from flow_compress.arch._spec import (
    AUTO_FAMILY,
    Activation,
    ArchSpec,
    AttentionLayout,
    BlockRule,
    Candidate,
    Family,
    Kind,
    LayerScale,
    OpaqueBlock,
    Source,
    activations,
    attention_layouts,
    block_rules,
    custom_models,
    families,
    find_registered,
    get_architecture,
    get_family,
    layer_scales,
    list_architectures,
    opaque_blocks,
    register_architecture,
    register_family,
    timm_models,
    torchvision_models,
    unregister_family,
)

__all__ = [
    "AUTO_FAMILY",
    "Activation",
    "ArchSpec",
    "AttentionLayout",
    "BlockRule",
    "Candidate",
    "Family",
    "Kind",
    "LayerScale",
    "OpaqueBlock",
    "Source",
    "activations",
    "attention_layouts",
    "block_rules",
    "custom_models",
    "families",
    "find_registered",
    "get_architecture",
    "get_family",
    "layer_scales",
    "list_architectures",
    "opaque_blocks",
    "register_architecture",
    "register_family",
    "timm_models",
    "torchvision_models",
    "unregister_family",
]

from flow_compress.arch import (  # noqa: F401  (each module registers its family)
    convnext,
    densenet,
    efficientnet,
    mobilenet,
    resnet,
    shufflenet,
    vgg,
    vit,
)
