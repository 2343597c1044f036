"""The ``divergence`` criterion: IDAP++'s flow divergence (docs/algorithm.md, "Flow
divergence"), and the formulas it and stage 2 use.

The formulas are pure functions: statistics in, scores out; nothing in them touches a model
or registers a hook (``flow_compress.criteria._statistics`` collects the statistics).
``score`` assembles them per group: the sum of δ over a group's coupled producers (removing a
root channel removes all of them), optionally weighted by the consumers' normalised input
norms, and δ(h) / (H·d_h) for attention heads (see ``_head_scores``).

Notation: ``act_norm`` is E_x[ ||A(l,c)(x)||_2 ], the mean over calibration samples of each
unit's post-normalisation, post-activation output norm (over spatial positions for a conv,
over tokens for a linear layer); ``weight`` is the layer's weight with output units first.

torch is imported where it is used, so that registering the criterion stays torch-free
(``flow_compress.criteria``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flow_compress.criteria import Criterion, ScoreRequest, register_criterion

if TYPE_CHECKING:
    import torch
    from torch import nn

    from flow_compress.criteria._statistics import UnitStats
    from flow_compress.graph import PrunableGroup


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().flatten(1).norm(dim=1).cpu()


def conv_channel_scores(
    act_norm: torch.Tensor, weight: torch.Tensor, spatial_size: int
) -> torch.Tensor:
    """δ(l,c) = E_x[||A(l,c)(x)||_2] · ||W(l,c)||_2 / (C_l · S_l).

    ``weight`` is C_out×C_in/g×kh×kw; ``spatial_size`` is S_l = H·W of the output. The
    1/(C_l·S_l) factor makes scores comparable across layers for the global ranking.
    """
    c = weight.shape[0]
    if act_norm.shape != (c,):
        raise ValueError(f"act_norm has shape {tuple(act_norm.shape)}, expected ({c},)")
    if spatial_size <= 0:
        raise ValueError("spatial_size must be positive")
    return act_norm.float().cpu() * _row_norms(weight) / (c * spatial_size)


def linear_neuron_scores(
    act_norm: torch.Tensor, weight: torch.Tensor, tokens: int = 1
) -> torch.Tensor:
    """δ(l,j) = E_x[||A(l,j)(x)||_2 over tokens] · ||W(l,j,:)||_2 / (D_l · N).

    ``weight`` is D_out×D_in; ``tokens`` is N (1 for a B×D input).
    """
    d = weight.shape[0]
    if act_norm.shape != (d,):
        raise ValueError(f"act_norm has shape {tuple(act_norm.shape)}, expected ({d},)")
    if tokens <= 0:
        raise ValueError("tokens must be positive")
    return act_norm.float().cpu() * _row_norms(weight) / (d * tokens)


def head_scores(
    head_out_norm: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    num_heads: int,
    tokens: int,
) -> torch.Tensor:
    """δ(h) = (1/N) · E_x||A_h(x)||_F · (||W_Q,h||_F + ||W_K,h||_F + ||W_V,h||_F).

    ``head_out_norm`` is E_x||softmax(Q_h K_hᵀ/√d)·V_h||_F per head (shape ``num_heads``);
    ``w_q``/``w_k``/``w_v`` are D_model×D_in projection weights whose rows are grouped by head.
    """
    if head_out_norm.shape != (num_heads,):
        raise ValueError(f"head_out_norm must have shape ({num_heads},)")
    if tokens <= 0:
        raise ValueError("tokens must be positive")

    def per_head(w: torch.Tensor) -> torch.Tensor:
        rows = w.detach().float().cpu().reshape(num_heads, -1)
        return rows.norm(dim=1)

    weight_term = per_head(w_q) + per_head(w_k) + per_head(w_v)
    return head_out_norm.float().cpu() * weight_term / tokens


def residual_score(branch_norm: torch.Tensor, input_norm: torch.Tensor) -> float:
    """D_res = E_x[ ||F(x)||_2 / (||x||_2 + 1e-6) ] from per-sample norms of branch and input."""
    if branch_norm.shape != input_norm.shape or branch_norm.ndim != 1 or len(branch_norm) == 0:
        raise ValueError("branch_norm and input_norm must be equal-length, non-empty vectors")
    return float((branch_norm.float() / (input_norm.float() + 1e-6)).mean())


def consumer_weights(in_norms: list[torch.Tensor]) -> torch.Tensor:
    """Normalised input-channel norms of a group's consumers (mean of max-normalised norms)."""
    import torch

    if not in_norms:
        raise ValueError("no consumers")
    stacked = torch.stack([n.float() / n.float().max().clamp_min(1e-12) for n in in_norms])
    return stacked.mean(dim=0)


# --------------------------------------------------------------------------- the criterion


def score(request: ScoreRequest) -> list[torch.Tensor]:
    """δ per root unit of every group: channels and neurons from their producers'
    post-activation outputs, heads from their attention outputs (one calibration pass)."""
    import torch
    from torch import nn

    from flow_compress.criteria._statistics import collect_head_stats, collect_unit_stats

    model, groups, batches, device = request.model, request.groups, request.batches, request.device
    taps = {}
    for g in groups:
        for p in g.producers:
            taps[p.name] = request.graph.tap_for(p.module)
    stats = collect_unit_stats(model, taps, batches, device)
    heads = [g.root_name for g in groups if g.unit == "head"]
    head_stats = collect_head_stats(model, heads, batches, device) if heads else {}
    out = []
    for g in groups:
        if g.unit == "head":
            out.append(_head_scores(model.get_submodule(g.root_name), head_stats[g.root_name]))
            continue
        total = torch.zeros(g.size, dtype=torch.float64)
        for p in g.producers:
            st = stats[p.name]
            w = p.module.weight  # type: ignore[union-attr]
            if isinstance(p.module, nn.Conv2d):
                delta = conv_channel_scores(st.act_norm, w, st.spatial)
            else:
                delta = linear_neuron_scores(st.act_norm, w, st.spatial)
            idx = torch.tensor(p.idxs, dtype=torch.long)
            ridx = torch.tensor(p.root_idxs, dtype=torch.long)
            ok = (ridx >= 0) & (ridx < g.size) & (idx < len(delta))
            total.index_add_(0, ridx[ok], delta[idx[ok]].double())
        if request.options.consumer_weighting and g.consumers:
            total *= _consumer_weights(g).double()
        out.append(total.float())
    return out


def _head_scores(layer: nn.Module, stats: UnitStats) -> torch.Tensor:
    """δ(h) / (H·d_h) per head: the paper's head score divided by the layer's attention width,
    the 1/D_l normalisation the channel and neuron formulas carry, so that a head ranks like
    the block of d_h channels it removes (within a layer the order is exactly the paper's)."""
    from flow_compress.arch import attention

    num_heads, head_dim, _ = attention.geometry(layer)
    wq, wk, wv = attention.qkv_weights(layer)
    delta = head_scores(stats.act_norm, wq, wk, wv, num_heads, stats.spatial)
    return (delta / (num_heads * head_dim)).float()


def _consumer_weights(g: PrunableGroup) -> torch.Tensor:
    import torch

    norms = []
    for c in g.consumers:
        w = c.module.weight.detach().float().cpu()  # type: ignore[union-attr]
        col = w.transpose(0, 1).flatten(1).norm(dim=1)  # per input channel
        per_root = torch.zeros(g.size)
        idx = torch.tensor(c.idxs, dtype=torch.long)
        ridx = torch.tensor(c.root_idxs, dtype=torch.long)
        ok = (ridx >= 0) & (ridx < g.size) & (idx < len(col))
        per_root.index_add_(0, ridx[ok], col[idx[ok]])
        norms.append(per_root)
    return consumer_weights(norms)


register_criterion(
    Criterion(
        name="divergence",
        description="IDAP++ flow divergence: activation norm × weight norm / (width × spatial "
        "size) per channel or neuron, attention-output × Q/K/V norms per head",
        score=score,
    )
)
