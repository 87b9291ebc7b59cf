"""Reference (plain PyTorch) CSR aggregation with fused epilogue, its backward and edge gradient.

A CSR matrix A [n, m] is (rowptr [n+1], col [E], weight [E]); row i holds the edges into
destination i from sources col[rowptr[i]:rowptr[i+1]].

``propagate_forward`` is the forward-only form for a graph's own in-edge CSR with unit edge
weights, every normalisation (GCN's D^-1/2, a mean's 1/degree, GIN's 1 + eps) in per-node
scales: no per-edge values are built or read (a whole-graph pass over 10^7 edges).

``edge_softmax`` / ``edge_softmax_backward``: the attention coefficients of GAT-type layers,
a softmax over each row's entries weighted by the entries' (edge) weights.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import activations

#: Largest exponent of the edge softmax (as the zoo's ``weighted_softmax``): keeps 0 * exp finite.
MAX_EXPONENT = 60.0
#: Added to every row's softmax denominator (as PyG's ``softmax``): a row of zero weights gives 0.
SOFTMAX_EPS = 1e-16


def _rows(rowptr: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=rowptr.device), rowptr.diff())


def spmm(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """A @ x: [n, f] with out[i] = sum_e weight[e] * x[col[e]] over row i."""
    out = x.new_zeros(rowptr.numel() - 1, x.shape[1])
    return out.index_add_(0, _rows(rowptr), weight.unsqueeze(1) * x[col])


def aggregate_forward(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor,
                      bias: Tensor | None = None, act: str = "none",
                      residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """out = act(A @ x + bias) + residual.

    Args: rowptr [n+1], col [E], weight [E], x [m, f], bias [f] or None, residual [n, f] or None.
    Returns: (out [n, f], saved) with ``saved`` as in :mod:`fastmetamer.ops.activations`.
    """
    pre = spmm(rowptr, col, weight, x)
    if bias is not None:
        pre = pre + bias
    out = activations.apply(pre, act)
    if residual is not None:
        out = out + residual
    return out, activations.save_for_backward(pre, act)


def aggregate_backward(t_rowptr: Tensor, t_col: Tensor, t_weight: Tensor, grad_out: Tensor,
                       saved: Tensor, act: str) -> Tensor:
    """grad_x = A^T @ (grad_out * act'(pre)), over the transposed CSR of A.

    Args: t_rowptr [m+1], t_col [E] (destination ids), t_weight [E]: A^T in CSR; grad_out [n, f];
    saved: the forward's saved state. Returns grad_x [m, f].
    """
    grad_pre = grad_out * activations.saved_derivative(saved, act, tuple(grad_out.shape))
    return spmm(t_rowptr, t_col, t_weight, grad_pre)


def aggregate_tangents(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """A @ x[p] for every tangent p (the sparse step of a batched JVP).

    Args: rowptr [n+1], col [E], weight [E], x [P, m, f] (P tangents). Returns [P, n, f]."""
    out = x.new_zeros(x.shape[0], rowptr.numel() - 1, x.shape[2])
    return out.index_add_(1, _rows(rowptr), weight[None, :, None] * x[:, col])


def edge_grad(rowptr: Tensor, col: Tensor, grad_out: Tensor, saved: Tensor, act: str,
              x: Tensor) -> Tensor:
    """SDDMM: d loss / d weight[e] = <grad_out[i] * act'(pre[i]), x[col[e]]> for e in row i.

    Returns [E]."""
    grad_pre = grad_out * activations.saved_derivative(saved, act, tuple(grad_out.shape))
    return (grad_pre[_rows(rowptr)] * x[col]).sum(1)


def propagate_forward(rowptr: Tensor, col: Tensor, x: Tensor, row_scale: Tensor | None = None,
                      self_x: Tensor | None = None, self_scale: Tensor | None = None,
                      bias: Tensor | None = None, act: str = "none", skip_loops: bool = False) -> Tensor:
    """out[i] = act(s_i * sum_{e in row i} x[col[e]] + t_i * self_x[i] + bias), forward only.

    Args: rowptr [n+1], col [E] (every entry weighs 1), x [m, f]; row_scale s [n] (None: 1);
    self_x [n, f] or None (no self term); self_scale t [n] (None: 1; needs self_x); bias [f] or
    None; ``skip_loops``: leave out the entries with col[e] == i (a row's self loops).
    Returns out [n, f]."""
    if self_scale is not None and self_x is None:
        raise ValueError("self_scale needs self_x")
    rows = _rows(rowptr)
    if skip_loops:
        keep = rows != col
        rows, col = rows[keep], col[keep]
    pre = x.new_zeros(rowptr.numel() - 1, x.shape[1]).index_add_(0, rows, x[col])
    if row_scale is not None:
        pre = pre * row_scale.unsqueeze(1)
    if self_x is not None:
        pre = pre + (self_x if self_scale is None else self_scale.unsqueeze(1) * self_x)
    if bias is not None:
        pre = pre + bias
    return activations.apply(pre, act)


def edge_softmax(rowptr: Tensor, logits: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Edge-weighted softmax over every row's entries, per head.

    alpha[e, h] = w_e exp(l_eh - m_ih) / (sum_{r in row i} w_r exp(l_rh - m_ih) + 1e-16), with
    m_ih the largest logit of row i's entries of positive weight (0 where none) and exponents
    clamped at 60; entries of weight 0 take no part (their alpha is 0). Weights are >= 0.

    Args: rowptr [n+1]; logits [E, H] (CSR order); weight [E].
    Returns: (alpha [E, H], beta [E, H]) with beta = d alpha / d w = exp(.) / denominator."""
    rows = _rows(rowptr)
    n, heads = rowptr.numel() - 1, logits.shape[1]
    index = rows.unsqueeze(1).expand(-1, heads)
    masked = logits.masked_fill((weight <= 0).unsqueeze(1), float("-inf"))
    top = logits.new_full((n, heads), float("-inf")).scatter_reduce(0, index, masked, "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    expo = (logits - top[rows]).clamp(max=MAX_EXPONENT).exp()
    numer = weight.unsqueeze(1) * expo
    denom = logits.new_zeros(n, heads).index_add_(0, rows, numer)[rows] + SOFTMAX_EPS
    return numer / denom, expo / denom


def edge_softmax_backward(rowptr: Tensor, alpha: Tensor, beta: Tensor, grad_alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`edge_softmax` (the row maximum is a constant shift).

    With dot_ih = sum_{r in row i} alpha_rh g_rh: d loss / d l_eh = alpha_eh (g_eh - dot_ih) and
    d loss / d w_e = sum_h beta_eh (g_eh - dot_ih).

    Args: rowptr [n+1]; alpha, beta [E, H] from the forward; grad_alpha g [E, H].
    Returns: (grad_logits [E, H], grad_weight [E])."""
    rows = _rows(rowptr)
    dot = alpha.new_zeros(rowptr.numel() - 1, alpha.shape[1]).index_add_(0, rows, alpha * grad_alpha)
    centred = grad_alpha - dot[rows]
    return alpha * centred, (beta * centred).sum(1)
