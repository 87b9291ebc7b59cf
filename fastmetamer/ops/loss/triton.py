"""Triton matched-layer loss: aggregation at the target rows fused with L_act and its gradient.

Same contract as :func:`.reference.matched_loss`.

Algorithm: the aggregation kernels' chunk plan (:mod:`..aggregate.triton`: a target row with more
than ``SPLIT`` edges is cut into chunks whose partial sums a second pass adds in chunk order). A
program takes ``BLOCK_R`` items and loops over the feature blocks: it aggregates, adds the bias,
applies the activation, forms ``diff = h - target`` in registers, accumulates each row's
``diff^2`` and writes ``grad_pre = 2 diff / scale[component[t]] * act'(pre)``; ``h`` is never
written. The per-row losses [T] are then summed per component deterministically: rows are ordered
by component (stable argsort, offsets by ``searchsorted``: no host synchronisation) and the
segment sums are one more aggregation over that CSR (unit weights, one feature), so no
floating-point atomics are involved.
"""
import os

import torch
from torch import Tensor

from .. import activations
from ..aggregate import triton as _agg

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None

AVAILABLE = triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")

if triton is not None:
    act_fn, act_grad, plan_items, plan_sum = _agg.act_fn, _agg.act_grad, _agg.plan_items, _agg.plan_sum

    @triton.jit
    def _matched_loss_kernel(row_ptr, lo_ptr, hi_ptr, slot_ptr, num_items, part_ptr,
                             col_ptr, w_ptr, x_ptr, bias_ptr, target_ptr, comp_ptr, scale_ptr, grad_ptr,
                             row_loss_ptr, f,
                             COMBINE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
                             ACC: tl.constexpr):
        rows, lo, hi, slot, done = plan_items(row_ptr, lo_ptr, hi_ptr, slot_ptr, num_items, COMBINE, BLOCK_R)
        comp = tl.load(comp_ptr + rows, mask=done, other=0)
        inv = 2.0 / tl.load(scale_ptr + comp, mask=done, other=1.0).to(ACC)
        total = tl.zeros([BLOCK_R], dtype=ACC)
        for f0 in range(0, f, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            fmask = offs_f < f
            pre = plan_sum(rows, lo, hi, slot, part_ptr, col_ptr, w_ptr, x_ptr, x_ptr, offs_f, fmask, f, 0,
                           COMBINE, True, False, -1, BLOCK_R, BLOCK_E, BLOCK_F, ACC)
            mask = done[:, None] & fmask[None, :]
            dst = rows[:, None] * f + offs_f[None, :]
            if HAS_BIAS:
                pre += tl.load(bias_ptr + offs_f, mask=fmask, other=0.0).to(ACC)[None, :]
            tgt = tl.load(target_ptr + dst, mask=mask, other=0.0).to(ACC)
            diff = tl.where(mask, act_fn(pre, ACT) - tgt, 0.0)
            total += tl.sum(diff * diff, axis=1)
            tl.store(grad_ptr + dst, diff * inv[:, None] * act_grad(pre, ACT), mask=mask)
        tl.store(row_loss_ptr + rows, total, mask=done)


def matched_loss(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor, target: Tensor,
                 component: Tensor, scale: Tensor, bias: Tensor | None = None,
                 act: str = "none") -> tuple[Tensor, Tensor]:
    """Per-problem activation-matching loss [C] and grad_pre [T, f]; see the reference."""
    _agg._check_available()
    code = activations.check_activation(act)
    dtype = _agg._dtype(x, weight, bias, target)
    num_rows, f = rowptr.numel() - 1, x.shape[1]
    device = x.device
    grad_pre = torch.empty(num_rows, f, dtype=dtype, device=device)
    row_loss = torch.zeros(num_rows, dtype=dtype, device=device)
    if num_rows > 0 and f > 0:
        _agg._run(_matched_loss_kernel, rowptr, col.numel(), f, dtype,
                  (col.contiguous(), weight.contiguous(), x.contiguous(),
                   bias.contiguous() if bias is not None else grad_pre, target.contiguous(),
                   component.contiguous(), scale.contiguous(), grad_pre, row_loss, f),
                  feature_grid=False, HAS_BIAS=bias is not None, ACT=code)
    # Deterministic per-component sums: a CSR whose row c lists the target rows of component c.
    num_comp = scale.numel()
    comp = component.to(device=device, dtype=torch.long)
    order = torch.argsort(comp, stable=True)
    seg_ptr = torch.searchsorted(comp[order], torch.arange(num_comp + 1, device=device))
    ones = torch.ones(num_rows, dtype=dtype, device=device)
    sums, _ = _agg.aggregate_forward(seg_ptr, order, ones, row_loss.unsqueeze(1))
    return sums[:, 0] / scale.to(dtype), grad_pre
