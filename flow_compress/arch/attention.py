"""Attention heads as prunable units, for every layout a family declares
(``AttentionLayout`` in ``flow_compress/arch/<family>.py``; the ViT family declares torch's
``nn.MultiheadAttention`` and timm's ``Attention``).

A layout's packed Q/K/V projection has rows ``[Q | K | V]``, grouped by head inside each part
(row ``s·A + h·d + i`` for part ``s``, head ``h``, channel ``i``; ``A = H·d`` is the attention
width). Removing head ``h`` removes its Q, K and V rows and the matching input columns of the
output projection, so forward, TorchScript and ONNX all see consistent shapes. The head score
is docs/algorithm.md's δ(h) (``flow_compress.criteria.divergence``); here are the layer-side
operations: geometry, head outputs, MACs per head, and removal. Nothing here imports
torch-pruning; ``flow_compress.graph`` makes these layers opaque to DepGraph and exposes their
heads as groups.

``PrunedMultiheadAttention`` is the head-pruned form of ``nn.MultiheadAttention``, whose
functional forward requires ``embed_dim == num_heads · head_dim``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flow_compress.arch._spec import AttentionLayout, attention_layouts
from flow_compress.errors import UnsupportedModelError


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention whose attention width ``num_heads · head_dim`` may be smaller than
    ``embed_dim`` (a head-pruned ``nn.MultiheadAttention``).

    Same call signature and return value as ``nn.MultiheadAttention`` (``(output, weights)``;
    weights are ``None`` unless ``need_weights``), same parameter names, so checkpoints of a
    pruned model load into a rebuilt one. Masks follow ``nn.MultiheadAttention``: a boolean
    ``attn_mask`` (L×S or (B·H)×L×S) or ``key_padding_mask`` (B×S) marks positions that may
    *not* be attended; a float ``attn_mask`` is added to the logits.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError("an attention layer needs at least one head of at least one channel")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        width = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width)) if bias else None
        self.out_proj = nn.Linear(width, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> PrunedMultiheadAttention:
        """An exact functional copy of ``mha`` (same weights, same outputs)."""
        if not mha_is_prunable(mha):
            raise UnsupportedModelError(
                "nn.MultiheadAttention with separate key/value dims, bias_k/bias_v or "
                "add_zero_attn cannot be head-pruned"
            )
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.head_dim,
            bias=mha.in_proj_bias is not None,
            dropout=float(mha.dropout),
            batch_first=mha.batch_first,
        )
        new.out_proj = nn.Linear(mha.embed_dim, mha.embed_dim, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight)
            if new.in_proj_bias is not None and mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if new.out_proj.bias is not None and mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype).train(mha.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n, _ = query.shape
        s = key.shape[1]
        h, d = self.num_heads, self.head_dim
        w = self.in_proj_weight
        width = h * d
        bias = self.in_proj_bias
        bq = bias[:width] if bias is not None else None
        bk = bias[width : 2 * width] if bias is not None else None
        bv = bias[2 * width :] if bias is not None else None
        q = F.linear(query, w[:width], bq).reshape(b, n, h, d).transpose(1, 2)
        k = F.linear(key, w[width : 2 * width], bk).reshape(b, s, h, d).transpose(1, 2)
        v = F.linear(value, w[2 * width :], bv).reshape(b, s, h, d).transpose(1, 2)
        logits = torch.matmul(q * (float(d) ** -0.5), k.transpose(-2, -1))
        if is_causal and attn_mask is None:
            causal = torch.ones(n, s, dtype=torch.bool, device=query.device).triu(1)
            logits = logits.masked_fill(causal, float("-inf"))
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(b, h, n, s)
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(mask, float("-inf"))
            else:
                logits = logits + mask
        if key_padding_mask is not None:
            pad = key_padding_mask.reshape(b, 1, 1, s)
            if pad.dtype == torch.bool:
                logits = logits.masked_fill(pad, float("-inf"))
            else:
                logits = logits + pad
        attn = torch.softmax(logits, dim=-1)
        if self.training and self.dropout > 0.0:
            attn = F.dropout(attn, p=self.dropout)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, width)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights: torch.Tensor | None = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
        return out, weights


def mha_is_prunable(m: nn.MultiheadAttention) -> bool:
    """Whether an ``nn.MultiheadAttention`` has the packed self-attention form whose heads
    ``PrunedMultiheadAttention`` can take over."""
    return bool(
        m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None and not m.add_zero_attn
    )


def layout_of(module: nn.Module) -> AttentionLayout | None:
    """The registered layout ``module`` is a layer of (handled as one opaque node), or None."""
    for layout in attention_layouts():
        if isinstance(module, layout.types()) and layout.matches(module):
            return layout
    return None


def _layout(module: nn.Module) -> AttentionLayout:
    layout = layout_of(module)
    if layout is None:
        raise UnsupportedModelError(f"{type(module).__name__} is not a known attention layer")
    return layout


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention layer whose heads can be pruned."""
    layout = layout_of(module)
    return layout is not None and layout.prunable(module)


def attention_types() -> tuple[type[nn.Module], ...]:
    """Every attention class that DepGraph must treat as one opaque node."""
    return tuple(t for layout in attention_layouts() for t in layout.types())


def geometry(module: nn.Module) -> tuple[int, int, int]:
    """``(num_heads, head_dim, embed_dim)`` of a recognised attention layer."""
    return _layout(module).geometry(module)


def qkv_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_Q, W_K, W_V (each A×D, rows grouped by head)."""
    w, _ = _layout(module).packed(module)
    width = w.shape[0] // 3
    return w[:width], w[width : 2 * width], w[2 * width :]


def head_weight_slices(module: nn.Module) -> list[torch.Tensor]:
    """Every weight tensor a head owns, as (H, …) views: Q/K/V rows and output-projection
    columns (for magnitude and Taylor criteria)."""
    h, _, _ = geometry(module)
    wq, wk, wv = qkv_weights(module)
    proj = _layout(module).out_proj(module).weight  # D_out × A
    return [
        wq.reshape(h, -1),
        wk.reshape(h, -1),
        wv.reshape(h, -1),
        proj.t().reshape(h, -1),
    ]


def head_grad_slices(module: nn.Module) -> list[torch.Tensor | None]:
    """The gradients matching ``head_weight_slices`` (None where there is no gradient)."""
    layout = _layout(module)
    h, _, _ = layout.geometry(module)
    w, _ = layout.packed(module)
    proj = layout.out_proj(module).weight
    out: list[torch.Tensor | None] = []
    if w.grad is None:
        out.extend([None, None, None])
    else:
        width = w.shape[0] // 3
        out.extend(w.grad[i * width : (i + 1) * width].reshape(h, -1) for i in range(3))
    out.append(None if proj.grad is None else proj.grad.t().reshape(h, -1))
    return out


def self_attention_input(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """The token tensor of a self-attention call, batch first (B×N×D), or None when the
    call is not self-attention (different query/key/value) or carries masks."""
    return _layout(module).tokens(module, args, kwargs)


@torch.no_grad()
def head_output_norms(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """‖A_h(x)‖_F per sample and head (B×H), A_h = softmax(Q_h K_hᵀ/√d)·V_h over all tokens.

    Recomputed from the layer's weights and its input ``x`` (B×N×D): the fused kernels of
    ``nn.MultiheadAttention`` never call ``out_proj`` as a module, so no hook could see A_h.
    """
    layout = _layout(module)
    h, d, _ = layout.geometry(module)
    w, bias = layout.packed(module)
    b, n, _ = x.shape
    qkv = F.linear(x.to(w.dtype), w, bias).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if layout.qk_norm is not None:
        q, k = layout.qk_norm(module, q, k)
    attn = torch.softmax(torch.matmul(q * (float(d) ** -0.5), k.transpose(-2, -1)), dim=-1)
    a = torch.matmul(attn, v)  # B×H×N×d
    return a.float().flatten(2).norm(dim=2)


def head_macs(module: nn.Module, tokens: int) -> float:
    """MACs one head costs per sample: its Q/K/V rows, its two attention matmuls and softmax,
    and its output-projection columns (the counting convention of ``attention_macs``)."""
    layout = _layout(module)
    _, d, embed = layout.geometry(module)
    proj = layout.out_proj(module)
    qkv = 3 * tokens * embed * d + 3 * tokens * d + tokens * d  # projections, bias, q scaling
    attn = 2 * tokens * tokens * d + tokens * tokens
    out = tokens * d * proj.out_features
    return float(qkv + attn + out)


def attention_macs(module: nn.Module, tokens: int) -> int:
    """MACs of a whole self-attention layer per sample (Q scaling, packed projections and
    bias, per-head QKᵀ, softmax and AV, output projection with bias), valid for any attention
    width — torch-pruning's stock counter assumes the width equals the embedding width."""
    layout = _layout(module)
    h, d, embed = layout.geometry(module)
    width = h * d
    proj = layout.out_proj(module)
    _, bias = layout.packed(module)
    macs = tokens * width + 3 * tokens * embed * width
    if bias is not None:
        macs += 3 * tokens * width
    macs += h * (2 * tokens * tokens * d + tokens * tokens)
    macs += tokens * width * proj.out_features + tokens * proj.out_features
    return int(macs)


def prune_heads(model: nn.Module, path: str, heads: Sequence[int]) -> nn.Module:
    """Remove ``heads`` (indices in the layer's current numbering) from the attention layer at
    ``path``; returns the (possibly new) layer now at ``path`` (the layout decides whether it
    is sliced in place or replaced, as ``nn.MultiheadAttention`` is by
    ``PrunedMultiheadAttention``). At least one head must remain."""
    module = model.get_submodule(path)
    if not is_attention(module):
        raise UnsupportedModelError(
            f"{path} ({type(module).__name__}) is not an attention layer whose heads can be pruned"
        )
    layout = _layout(module)
    h, d, _ = layout.geometry(module)
    drop = {int(i) for i in heads}
    if any(i < 0 or i >= h for i in drop):
        raise ValueError(f"head indices {sorted(drop)} out of range for {h} heads at {path}")
    keep = [i for i in range(h) if i not in drop]
    if not keep:
        raise UnsupportedModelError(f"pruning every head of {path} would empty the layer")
    rows = torch.tensor([hh * d + i for hh in keep for i in range(d)], dtype=torch.long)
    width = h * d
    packed_rows = torch.cat([rows, rows + width, rows + 2 * width])
    return layout.prune(model, path, module, packed_rows, rows, keep)


__all__ = [
    "PrunedMultiheadAttention",
    "attention_macs",
    "attention_types",
    "geometry",
    "head_grad_slices",
    "head_macs",
    "head_output_norms",
    "head_weight_slices",
    "is_attention",
    "layout_of",
    "mha_is_prunable",
    "prune_heads",
    "qkv_weights",
    "self_attention_input",
]
