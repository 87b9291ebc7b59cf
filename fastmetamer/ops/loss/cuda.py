"""CUDA C++ matched-layer loss: aggregation at the target rows fused with L_act
(``csrc/cuda/loss.cu``).

Same function and signature as :mod:`fastmetamer.ops.loss.reference` (the contract); float32 /
int64 contiguous tensors on one CUDA device, validated as in :mod:`fastmetamer.ops.aggregate.cuda`
(plus component ids in [0, C), checked on the device in the same single synchronisation, once per
unchanged CSR and component tensors).

Kernels: the target rows are summed as the aggregation's rows (a warp per row, a block per row of
degree > 512, lanes on consecutive features); each row's epilogue writes grad_pre and adds its
squared errors in double, reduced over the warp (and the block's warps) in a fixed order into a
float64 per-row loss; h is never written. The per-component loss is a deterministic kernel too: a
block per component sums its rows' float64 losses, listed in row order by a stable device sort of
``component`` (torch.sort, once per component tensor), in a fixed order, and divides by the scale
in float64. No atomics and no host synchronisation in the kernels: results are bitwise identical
run to run.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import activations, cuda_library
from ..memo import Memo
from ..aggregate.cuda import _check, _check_csr, _csr_conditions, _verify_once

AVAILABLE = cuda_library.available()
_SEGMENTS = Memo()  # component tensor -> its rows by component: the engine's component is fixed


def _segments(component: Tensor, num_components: int) -> tuple[Tensor, Tensor]:
    """(order [T]: the rows sorted stably by component, ptr [C + 1]: each component's run in it)."""
    ordered, order = torch.sort(component, stable=True)
    return order, torch.searchsorted(ordered, torch.arange(num_components + 1, device=component.device))


def matched_loss(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor, target: Tensor,
                 component: Tensor, scale: Tensor, bias: Tensor | None = None,
                 act: str = "none") -> tuple[Tensor, Tensor]:
    """(loss [C], grad_pre [T, f]) as :func:`fastmetamer.ops.loss.reference.matched_loss`."""
    code = activations.check_activation(act)
    T, device = _check_csr(rowptr, col, weight)
    _check(x, "x", torch.float32, 2, device=device)
    m, f = x.shape
    _check(target, "target", torch.float32, 2, (T, f), device)
    _check(component, "component", torch.int64, 1, (T,), device)
    _check(scale, "scale", torch.float32, 1, device=device)
    if bias is not None:
        _check(bias, "bias", torch.float32, 1, (f,), device)
    C = scale.numel()
    _verify_once((rowptr, col, component), (m, C), lambda: _csr_conditions(rowptr, col, m) + [
        (((component >= 0) & (component < C)).all(), f"component entries must lie in [0, {C})")])
    order, seg_ptr = _SEGMENTS.get([component], (C,), lambda: _segments(component, C))
    row_loss = torch.empty(T, dtype=torch.float64, device=device)
    loss = torch.empty(C, dtype=torch.float32, device=device)
    grad_pre = torch.empty(T, f, dtype=torch.float32, device=device)
    cuda_library.call("matched_loss", rowptr, col, weight, x, target, component, scale, bias, order, seg_ptr,
            row_loss, loss, grad_pre, T, f, C, code)
    return loss, grad_pre
