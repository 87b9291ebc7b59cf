"""Triton matched-layer loss: aggregation at the target rows fused with L_act and its gradient.

Same contract as :func:`.reference.matched_loss`.

Algorithm: one program per target row t. For each feature block it aggregates the row's edges
(the aggregation kernel's inner loop), adds the bias, applies the activation, forms
``diff = h - target`` in registers, accumulates ``diff^2`` for the row and writes
``grad_pre = 2 diff / scale[component[t]] * act'(pre)``; ``h`` is never written. The per-row loss
vector [T] is then summed per component deterministically: rows are ordered by component
(stable argsort) and the segment sums are one more pass of the aggregation kernel over that
CSR (unit weights, one feature), so no floating-point atomics are involved.
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
    act_fn, act_grad, row_aggregate = _agg.act_fn, _agg.act_grad, _agg.row_aggregate

    @triton.jit
    def _matched_loss_kernel(rowptr_ptr, col_ptr, w_ptr, x_ptr, bias_ptr, target_ptr, comp_ptr,
                             scale_ptr, grad_ptr, row_loss_ptr, f,
                             HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_F: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        comp = tl.load(comp_ptr + row)
        inv = 2.0 / tl.load(scale_ptr + comp).to(ACC)
        total = tl.zeros([BLOCK_F], dtype=ACC)
        for f0 in range(0, f, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            fmask = offs_f < f
            pre = row_aggregate(rowptr_ptr, col_ptr, w_ptr, x_ptr, row, offs_f, fmask, f,
                                BLOCK_E, BLOCK_F, ACC)
            if HAS_BIAS:
                pre += tl.load(bias_ptr + offs_f, mask=fmask, other=0.0).to(ACC)
            tgt = tl.load(target_ptr + row * f + offs_f, mask=fmask, other=0.0).to(ACC)
            diff = tl.where(fmask, act_fn(pre, ACT) - tgt, 0.0)
            total += diff * diff
            tl.store(grad_ptr + row * f + offs_f, diff * inv * act_grad(pre, ACT), mask=fmask)
        tl.store(row_loss_ptr + row, tl.sum(total, axis=0))


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
        block_f = _agg._block_f(f)
        _matched_loss_kernel[(num_rows,)](
            rowptr.contiguous(), col.contiguous(), weight.contiguous(), x.contiguous(),
            bias.contiguous() if bias is not None else grad_pre, target.contiguous(),
            component.contiguous(), scale.contiguous(), grad_pre, row_loss, f,
            HAS_BIAS=bias is not None, ACT=code, BLOCK_E=_agg.BLOCK_E, BLOCK_F=block_f,
            ACC=_agg._acc_dtype(dtype))
    # Deterministic per-component sums: a CSR whose row c lists the target rows of component c.
    num_comp = scale.numel()
    comp = component.to(device=device, dtype=torch.long)
    order = torch.argsort(comp, stable=True)
    seg_ptr = torch.zeros(num_comp + 1, dtype=torch.long, device=device)
    seg_ptr[1:] = torch.bincount(comp, minlength=num_comp).cumsum(0)
    ones = torch.ones(num_rows, dtype=dtype, device=device)
    sums, _ = _agg.aggregate_forward(seg_ptr, order, ones, row_loss.unsqueeze(1))
    return sums[:, 0] / scale.to(dtype), grad_pre
