"""Attention stages (GAT, GATv2) on the fast engine: the logits of every operator entry from the
stage's transformed input, their edge-weighted softmax per row (the ``edge_softmax`` op of the
chosen backend) and one fused aggregation per head (see :class:`~.lowering.Attention`)."""
from __future__ import annotations

import torch
import torch.nn.functional as torch_f
from torch import Tensor

from ..ops.activations import apply
from ..ops.memo import Memo
from . import functions as F
from .csr import Operator, Pattern
from .lowering import Stage


class EntryIndex:
    """Per pattern, what an attention stage needs besides its CSR: ``rows`` [E] (the row of every
    CSR entry) and ``transposed`` [E] (the CSR position of every entry of the transpose, None for
    a forward-only pattern), built once per pattern and kept while its tensors live (a bounded
    :class:`~fastmetamer.ops.memo.Memo`: a structure metamer's resampled patterns are dropped)."""

    def __init__(self):
        self._known = Memo(8)

    def of(self, pattern: Pattern) -> tuple[Tensor, Tensor | None]:
        tensors = [t for t in (pattern.rowptr, pattern.order, pattern.t_order) if t is not None]
        return self._known.get(tensors, (pattern.num_rows,), lambda: _entry_index(pattern))


def _entry_index(pattern: Pattern) -> tuple[Tensor, Tensor | None]:
    rows = torch.repeat_interleave(torch.arange(pattern.num_rows, device=pattern.rowptr.device),
                                   pattern.rowptr.diff(), output_size=pattern.col.numel())
    if pattern.t_order is None:
        return rows, None
    sorted_order, position = pattern.order.sort()  # both orders index the same coordinate entries
    return rows, position.index_select(0, torch.searchsorted(sorted_order, pattern.t_order))


def source_features(stage: Stage, inputs: Tensor) -> Tensor:
    """xw [m, H*C]: the stage's transformed input plus the source bias (GATv2's lin_l bias)."""
    bias = stage.attention.src_bias
    return inputs if bias is None else inputs + bias


def destination_features(stage: Stage, xw: Tensor, h_rows: Tensor | None, positions: Tensor | None) -> Tensor:
    """The destination side [r, H*C] at the stage's rows: xw there (GAT; GATv2 with shared
    weights) or x @ dst_weight + dst_bias (GATv2), from the stage input at its rows ``h_rows``;
    ``positions``: the rows among xw's rows (None: the same rows)."""
    att = stage.attention
    if att.dst_weight is None:
        return xw if positions is None else xw.index_select(0, positions)
    out = h_rows @ att.dst_weight
    return out if att.dst_bias is None else out + att.dst_bias


def logits(stage: Stage, xw: Tensor, xr: Tensor, rows: Tensor, col: Tensor) -> Tensor:
    """The attention logit [E, H] of every CSR entry (row ``rows[e]`` <- column ``col[e]``)."""
    att = stage.attention
    heads, channels = att.heads, att.channels
    if att.v2:
        hidden = torch_f.leaky_relu(xw.index_select(0, col) + xr.index_select(0, rows), att.slope)
        return (hidden.view(-1, heads, channels) * att.att).sum(-1)
    src = (xw.view(-1, heads, channels) * att.att_src).sum(-1)
    dst = (xr.view(-1, heads, channels) * att.att_dst).sum(-1)
    return torch_f.leaky_relu(src.index_select(0, col) + dst.index_select(0, rows), att.slope)


def attend(stage: Stage, xw: Tensor, xr: Tensor, weights: Operator, index: EntryIndex, kernels: dict,
           residual: Tensor | None) -> Tensor:
    """The stage's output act(heads(sum_e alpha_e xw_j) + bias) + residual [r, H*C or C]:
    ``weights`` is the stage's operator whose values are the entries' weights (CSR order)."""
    att, pattern = stage.attention, weights.pattern
    rows, transposed = index.of(pattern)
    alpha = F.edge_softmax(logits(stage, xw, xr, rows, pattern.col), weights.value, pattern.rowptr, kernels)
    if att.heads == 1:
        return F.aggregate(xw, _head_operator(pattern, alpha[:, 0], transposed), kernels, stage.bias, stage.act,
                           residual)
    width = att.channels
    heads = [F.aggregate(xw[:, h * width:(h + 1) * width], _head_operator(pattern, alpha[:, h], transposed), kernels)
             for h in range(att.heads)]
    pre = torch.cat(heads, dim=1) if att.concat else torch.stack(heads).mean(0)
    out = apply(pre if stage.bias is None else pre + stage.bias, stage.act)
    return out if residual is None else out + residual


def _head_operator(pattern: Pattern, value: Tensor, transposed: Tensor | None) -> Operator:
    """One head's operator: ``value`` [E] in CSR order (with its gradient), its transpose's copy."""
    value = value.contiguous()
    t_value = None if transposed is None else value.detach().index_select(0, transposed)
    return Operator(pattern, value, t_value)
