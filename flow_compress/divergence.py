"""Flow divergence scores (ALGORITHM.md, "Flow divergence").

Pure functions: statistics in, scores out. Nothing here touches a model or registers a hook;
``flow_compress.calibration`` collects the statistics.

Notation: ``act_norm`` is E_x[ ||A(l,c)(x)||_2 ], the mean over calibration samples of each
unit's post-normalisation, post-activation output norm (over spatial positions for a conv,
over tokens for a linear layer); ``weight`` is the layer's weight with output units first.
"""

from __future__ import annotations

import torch


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
    if not in_norms:
        raise ValueError("no consumers")
    stacked = torch.stack([n.float() / n.float().max().clamp_min(1e-12) for n in in_norms])
    return stacked.mean(dim=0)
