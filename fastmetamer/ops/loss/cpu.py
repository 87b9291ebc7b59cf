"""CPU (C++ / OpenMP) matched-layer loss: aggregation at the target rows fused with L_act.

Same function and signature as :mod:`fastmetamer.ops.loss.reference` (the contract): h is never
written; the per-component loss is reduced deterministically (per row, then per component in row
order, in float64). float32 / int64 contiguous CPU tensors; bad inputs raise ValueError.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import activations
from ..aggregate.cpu import _C, _check, _check_csr

AVAILABLE = _C is not None


def matched_loss(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor, target: Tensor,
                 component: Tensor, scale: Tensor, bias: Tensor | None = None,
                 act: str = "none") -> tuple[Tensor, Tensor]:
    """(loss [C], grad_pre [T, f]) as :func:`fastmetamer.ops.loss.reference.matched_loss`."""
    code = activations.check_activation(act)
    T = _check_csr(rowptr, col, weight)
    _check(x, "x", torch.float32, 2)
    f = x.shape[1]
    _check(target, "target", torch.float32, 2, (T, f))
    _check(component, "component", torch.int64, 1, (T,))
    _check(scale, "scale", torch.float32, 1)
    if bias is not None:
        _check(bias, "bias", torch.float32, 1, (f,))
    return _C.matched_loss(rowptr, col, weight, x, target, component, scale, bias, code)
