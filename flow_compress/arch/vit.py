"""Vision transformers: torchvision's ``vit_b_16`` (``EncoderBlock`` with
``nn.MultiheadAttention``) and timm's ``vit_*`` (``Block`` with timm's ``Attention``).

Stage 1 prunes attention heads (δ(h)) and MLP hidden neurons; the embedding width is coupled
to every attention layer and is kept. Two attention layouts:

- ``nn.MultiheadAttention``: its functional forward requires ``embed_dim == num_heads ·
  head_dim``, so a head-pruned layer becomes ``PrunedMultiheadAttention`` (same call
  signature, return value and state-dict keys, free attention width). Instances with separate
  key/value dims, ``bias_k``/``bias_v`` or ``add_zero_attn`` stay opaque and unpruned.
- timm's ``Attention`` (``qkv`` → heads → ``norm`` → ``proj``, optional per-head ``q_norm``/
  ``k_norm`` and ``gate``): sliced in place; ``num_heads`` and ``attn_dim`` follow (``head_dim``
  and the softmax scale do not change, since whole heads go). Exact type only: a subclass may
  change the forward pass.

timm's ``LayerScale``/``LayerScale2d`` γ follow their channel. Stage 2: every encoder block →
identity (its shape never changes). The input size is passed to the builders, which size the
position embeddings from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flow_compress.arch import (
    AttentionLayout,
    BlockRule,
    Family,
    Kind,
    LayerScale,
    register_family,
    timm_models,
    torchvision_models,
)
from flow_compress.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import nn


# --------------------------------------------------------------------------- blocks


def _match(m: nn.Module) -> tuple[Kind, str | None] | None:
    from torchvision.models.vision_transformer import EncoderBlock

    if isinstance(m, EncoderBlock):
        return ("identity", None)
    try:
        from timm.models.vision_transformer import Block
    except ImportError:  # timm is optional for torchvision-only users
        return None
    return ("identity", None) if type(m) is Block else None


def _layer_scale_types() -> tuple[type[nn.Module], ...]:
    try:
        from timm.layers import LayerScale as TimmLayerScale
        from timm.layers import LayerScale2d
    except ImportError:
        return ()
    return (TimmLayerScale, LayerScale2d)


def _is_layer_scale(m: nn.Module) -> bool:
    types = _layer_scale_types()
    return bool(types) and isinstance(m, types)


# --------------------------------------------------------------------------- nn.MultiheadAttention


def _mha_types() -> tuple[type[nn.Module], ...]:
    from torch import nn

    from flow_compress.arch.attention import PrunedMultiheadAttention

    return (nn.MultiheadAttention, PrunedMultiheadAttention)


def _mha_prunable(m: nn.Module) -> bool:
    from torch import nn

    from flow_compress.arch.attention import mha_is_prunable

    return not isinstance(m, nn.MultiheadAttention) or mha_is_prunable(m)


def _mha_tokens(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    names = ("query", "key", "value")
    qkv = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
    if any(t is None for t in qkv) or not (qkv[0] is qkv[1] is qkv[2]):
        return None
    if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
        return None
    x = qkv[0]
    return x if m.batch_first else x.transpose(0, 1)


def _mha_prune(
    model: nn.Module,
    path: str,
    m: nn.Module,
    packed_rows: torch.Tensor,
    rows: torch.Tensor,
    keep: list[int],
) -> nn.Module:
    from torch import nn

    from flow_compress.arch.attention import PrunedMultiheadAttention
    from flow_compress.arch.surgery import replace_module, slice_linear_cols

    if isinstance(m, nn.MultiheadAttention):
        m = PrunedMultiheadAttention.from_mha(m)
        replace_module(model, path, m)
    m.in_proj_weight = nn.Parameter(m.in_proj_weight.data[packed_rows].clone())
    if m.in_proj_bias is not None:
        m.in_proj_bias = nn.Parameter(m.in_proj_bias.data[packed_rows].clone())
    slice_linear_cols(m.out_proj, rows)
    m.num_heads = len(keep)
    return m


TORCH_MULTIHEAD = AttentionLayout(
    name="torch-multihead-attention",
    types=_mha_types,
    matches=lambda m: True,
    prunable=_mha_prunable,
    geometry=lambda m: (int(m.num_heads), int(m.head_dim), int(m.embed_dim)),
    packed=lambda m: (m.in_proj_weight, m.in_proj_bias),
    out_proj=lambda m: m.out_proj,
    tokens=_mha_tokens,
    prune=_mha_prune,
)


# --------------------------------------------------------------------------- timm Attention


def _timm_types() -> tuple[type[nn.Module], ...]:
    try:
        from timm.layers import Attention
    except ImportError:
        return ()
    return (Attention,)


def _timm_matches(m: nn.Module) -> bool:
    """timm's ``Attention`` and subclasses that keep its forward pass (and its layers)."""
    types = _timm_types()
    if not types or not isinstance(m, types):
        return False
    from torch import nn

    return (
        type(m).forward is types[0].forward
        and isinstance(getattr(m, "qkv", None), nn.Linear)
        and isinstance(getattr(m, "proj", None), nn.Linear)
    )


def _timm_tokens(
    m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("x")
    if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
        return None
    return x


def _timm_prune(
    model: nn.Module,
    path: str,
    m: nn.Module,
    packed_rows: torch.Tensor,
    rows: torch.Tensor,
    keep: list[int],
) -> nn.Module:
    from flow_compress.arch.surgery import slice_linear_cols, slice_linear_rows, slice_norm

    try:
        slice_norm(m.norm, rows)
    except TypeError as exc:
        raise UnsupportedModelError(f"attention output norm at {path}: {exc}") from exc
    slice_linear_rows(m.qkv, packed_rows)
    slice_linear_cols(m.proj, rows)
    gate = getattr(m, "gate", None)
    if gate is not None:
        slice_linear_rows(gate, rows)
    m.num_heads = len(keep)
    m.attn_dim = len(keep) * m.head_dim
    return m


TIMM_ATTENTION = AttentionLayout(
    name="timm-attention",
    types=_timm_types,
    matches=_timm_matches,
    prunable=_timm_matches,
    geometry=lambda m: (int(m.num_heads), int(m.head_dim), int(m.qkv.in_features)),
    packed=lambda m: (m.qkv.weight, m.qkv.bias),
    out_proj=lambda m: m.proj,
    tokens=_timm_tokens,
    prune=_timm_prune,
    qk_norm=lambda m, q, k: (m.q_norm(q), m.k_norm(k)),
)


register_family(
    Family(
        name="vit",
        architectures=(
            *torchvision_models("vit", "vit_b_16"),
            *timm_models(
                "vit",
                vit_tiny_patch16_224="vit_tiny_patch16_224",
                vit_small_patch16_224="vit_small_patch16_224",
                vit_base_patch16_224="vit_base_patch16_224",
            ),
        ),
        small="vit_tiny_patch16_224",
        paper="vit_b_16",
        input_size_arg={"torchvision": "image_size", "timm": "img_size"},
        block_rules=(BlockRule("vit-encoder-block", _match),),
        layer_scales=(LayerScale("timm-layer-scale", _is_layer_scale, lambda m: m.gamma),),
        attention=(TORCH_MULTIHEAD, TIMM_ATTENTION),
    )
)
