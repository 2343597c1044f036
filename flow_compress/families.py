"""What the structural pruner must know about each architecture family (ALGORITHM.md,
"Architecture notes"), kept apart from torch-pruning so the rules read as plain data.

- ``check_supported``: refuse, up front and by name, layer types that stage 1 cannot score or
  slice (an ``unsupported_model`` error naming the type and its path), instead of failing
  deep inside a pruning step.
- ``OPAQUE_BLOCKS``: blocks that DepGraph must see as one node because torch-pruning cannot
  trace through them (ShuffleNetV2's channel shuffle raises ZeroDivisionError in
  torch-pruning 1.6). Channels that enter or leave such a block are never pruned; the
  ``scopes`` inside it (children that never cross the shuffle) are traced on their own and
  only their *internal* channels become groups — for ShuffleNetV2 the inner width
  1×1 → depthwise → 1×1 of each unit's ``branch2``.
- ``declared_parameters``: parameters that sit outside standard layers but follow a channel
  (ConvNeXt's layer scale, timm's ``LayerScale``), with the dimension that follows it. Groups
  that touch any *other* free-standing parameter (class tokens, position embeddings, unknown
  user parameters) are not pruned.
- Attention layers (``flow_compress.attention``) are opaque too; their heads are separate
  units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from flow_compress.attention import is_attention
from flow_compress.errors import UnsupportedModelError

# Leaf layers holding parameters that stage 1 can score and slice (norms follow their conv or
# linear producer). Anything else with its own parameters must be declared below.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.GroupNorm,
)


@dataclass(frozen=True)
class OpaqueBlock:
    """A block DepGraph treats as one node; only channels internal to ``scopes`` are pruned."""

    name: str
    match: Callable[[nn.Module], bool]
    scopes: Callable[[nn.Module], tuple[str, ...]]
    channel_dim: int = 1


def _is_shufflenet_unit(m: nn.Module) -> bool:
    from torchvision.models.shufflenetv2 import InvertedResidual

    return type(m) is InvertedResidual


OPAQUE_BLOCKS: tuple[OpaqueBlock, ...] = (
    OpaqueBlock(
        "torchvision-shufflenet-v2-unit",
        _is_shufflenet_unit,
        # branch1 (stride-2 units) is depthwise → 1×1 on the unit's input: every one of its
        # channels crosses the shuffle, so it has no internal width.
        lambda m: ("branch2",),
    ),
)


def opaque_block(module: nn.Module) -> OpaqueBlock | None:
    return next((b for b in OPAQUE_BLOCKS if b.match(module)), None)


def _layer_scale_types() -> tuple[type[nn.Module], ...]:
    try:
        from timm.layers import LayerScale, LayerScale2d
    except ImportError:
        return ()
    return (LayerScale, LayerScale2d)


def declared_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Free-standing parameters that follow a channel, with the dimension that follows it."""
    from torchvision.models.convnext import CNBlock

    out: list[tuple[nn.Parameter, int]] = []
    scale_types = _layer_scale_types()
    for m in model.modules():
        if isinstance(m, CNBlock):
            out.append((m.layer_scale, 0))  # C×1×1, multiplies the block's NCHW output
        elif scale_types and isinstance(m, scale_types):
            out.append((m.gamma, 0))  # type: ignore[arg-type]
    return out


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def check_supported(model: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` naming the first layer type stage 1 cannot handle.

    Handled: the layers in ``SUPPORTED_LAYERS`` (grouped and depthwise convolutions
    included), recognised attention layers, opaque blocks, declared free-standing parameters,
    and containers that hold extra parameters of their own (class tokens, position
    embeddings), which are never pruned. Refused: any other leaf layer with parameters
    (recurrent, 1-D/3-D or transposed convolutions, embeddings, ...) and attention layers of
    an unknown layout (their head structure would be cut blindly).
    """
    declared = {id(p) for p, _ in declared_parameters(model)}
    handled: list[str] = []
    for path, m in model.named_modules():
        if _inside(path, handled):
            continue
        if is_attention(m) or isinstance(m, nn.MultiheadAttention) or opaque_block(m):
            handled.append(path)
            continue
        kind = type(m).__name__
        if "attention" in kind.lower() and any(True for _ in m.parameters()):
            raise UnsupportedModelError(
                f"attention layer type {kind} (at {path or '<root>'}) is not supported: "
                "head pruning knows torch.nn.MultiheadAttention and timm's Attention"
            )
        own = list(m.parameters(recurse=False))
        if not own or isinstance(m, SUPPORTED_LAYERS):
            continue
        if all(id(p) in declared for p in own):
            continue
        if any(True for _ in m.children()):
            continue  # a container's own tensors (tokens, embeddings) are excluded from groups
        raise UnsupportedModelError(
            f"layer type {kind} (at {path}) is not supported for structural pruning; "
            f"supported layers: {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}, "
            "nn.MultiheadAttention, timm Attention"
        )


__all__ = [
    "OPAQUE_BLOCKS",
    "SUPPORTED_LAYERS",
    "OpaqueBlock",
    "check_supported",
    "declared_parameters",
    "opaque_block",
]
