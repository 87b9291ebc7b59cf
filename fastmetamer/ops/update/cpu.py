"""CPU (C++ / OpenMP) fused update of binary straight-through features.

Same functions and signatures as :mod:`fastmetamer.ops.update.reference` (the contract).
``top_mask`` selects with ``std::nth_element`` on a scratch copy per row block (blocks in
parallel; one huge block uses all threads for the sigmoid and marking passes) and sets exactly
k[c] ones per block (ties at the k-th value broken in memory order). ``adam_ste_update`` is one
fused, parallel elementwise pass, in place; given the first layer's gradient as a product, it forms
the product tile by tile right before each tile's update. ``linear_input_grad`` runs the GEMM in
tiles of rows that stay in cache, in parallel (twice as fast as one GEMM of this shape, see
``csrc/cpu/common.h``). float32 / int64 / bool contiguous CPU tensors; bad
inputs raise ValueError.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..aggregate.cpu import _C, _check
from .reference import check_bound

AVAILABLE = _C is not None


def top_mask(theta: Tensor, ptr: Tensor, k: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """(hard [F, d] float 0/1, threshold [F]) as :func:`fastmetamer.ops.update.reference.top_mask`.

    Blocks must be non-decreasing row offsets within [0, F]; rows outside every block (only when
    ptr does not cover all rows) get mask 0 and threshold 0.
    """
    _check_blocks(theta, ptr, k)
    return _C.top_mask(theta, ptr, k, float(slope))


def top_mask_csr(theta: Tensor, ptr: Tensor, k: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(rowptr [F + 1], col [nnz], threshold [F]) as :func:`fastmetamer.ops.update.reference.top_mask_csr`:
    the columns are written during the selection, so the dense mask is never formed."""
    _check_blocks(theta, ptr, k)
    return _C.top_mask_csr(theta, ptr, k, float(slope))


def _check_blocks(theta: Tensor, ptr: Tensor, k: Tensor) -> None:
    """theta [F, d] float32, ptr [C + 1] int64 (C >= 0), k [C] int64."""
    _check(theta, "theta", torch.float32, 2)
    _check(ptr, "ptr", torch.int64, 1)
    if ptr.numel() < 1:
        raise ValueError("ptr must have C + 1 >= 1 entries")
    _check(k, "k", torch.int64, 1, (ptr.numel() - 1,))


def linear_input_grad(out: Tensor, grad: Tensor, weight: Tensor, accumulate: bool) -> None:
    """``out`` [F, d] (+)= ``grad`` [F, f] @ ``weight``^T (``weight`` [d, f]), in place, as
    :func:`fastmetamer.ops.update.reference.linear_input_grad`."""
    _check(grad, "grad", torch.float32, 2)
    _check(weight, "weight", torch.float32, 2, (weight.shape[0], grad.shape[1]))
    _check(out, "out", torch.float32, 2, (grad.shape[0], weight.shape[0]))
    _C.linear_input_grad(out, grad, weight, bool(accumulate))


def adam_ste_update(theta: Tensor, grad_x: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                    step: int, lr: float, beta1: float, beta2: float, eps: float, slope: float,
                    threshold: Tensor, margin: float, margin_scale: Tensor, active: Tensor,
                    bound: float | None = None, grad_product: tuple[Tensor, Tensor] | None = None) -> None:
    """One fused straight-through + margin + Adam step and the clamp of theta to [-bound, bound]
    (None: no clamp), in place, in one pass (see the reference). With ``grad_product`` the
    product is formed one cache-sized tile of rows at a time, right before the tile's update."""
    _check(theta, "theta", torch.float32, 2)
    shape = tuple(theta.shape)
    if grad_x is None and grad_product is None:
        grad_x = torch.zeros_like(theta)
    if grad_x is not None:
        _check(grad_x, "grad_x", torch.float32, 2, shape)
    grad_rows, weight = (None, None) if grad_product is None else grad_product
    if grad_product is not None:
        _check(grad_rows, "grad_rows", torch.float32, 2, (shape[0], grad_rows.shape[-1]))
        _check(weight, "weight", torch.float32, 2, (shape[1], grad_rows.shape[1]))
    _check(exp_avg, "exp_avg", torch.float32, 2, shape)
    _check(exp_avg_sq, "exp_avg_sq", torch.float32, 2, shape)
    _check(threshold, "threshold", torch.float32, 1, shape[:1])
    _check(margin_scale, "margin_scale", torch.float32, 1, shape[:1])
    _check(active, "active", torch.bool, 1, shape[:1])
    if int(step) < 1:
        raise ValueError(f"step counts from 1, got {step}")
    _C.adam_ste_update(theta, grad_x, exp_avg, exp_avg_sq, int(step), float(lr), float(beta1),
                       float(beta2), float(eps), float(slope), threshold, float(margin),
                       margin_scale, active, check_bound(bound), grad_rows, weight)
