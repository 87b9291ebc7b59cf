"""CPU (C++ / OpenMP) CSR aggregation with fused epilogue, its backward and edge gradient.

Same functions, signatures and saved-state format as :mod:`fastmetamer.ops.aggregate.reference`
(the contract); float32 CPU tensors and int64 indices, contiguous. Inputs are validated here
(dtype, device, contiguity, shapes: ValueError); the extension also checks the CSR structure
(monotone rowptr, column ids in range) before touching memory.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .. import activations
from ..checks import check_tensor

try:
    from fastmetamer import _C
except ImportError:  # extension not built: the backend reports itself unavailable
    _C = None
AVAILABLE = _C is not None


_check = partial(check_tensor, backend="cpu")


def _check_csr(rowptr: Tensor, col: Tensor, weight: Tensor | None) -> int:
    _check(rowptr, "rowptr", torch.int64, 1)
    if rowptr.numel() < 1:
        raise ValueError("rowptr must have n + 1 >= 1 entries")
    _check(col, "col", torch.int64, 1)
    if weight is not None:
        _check(weight, "weight", torch.float32, 1, (col.numel(),))
    return rowptr.numel() - 1


def _check_saved(saved: Tensor, act: str, n: int, f: int) -> None:
    if act == "none":
        if not isinstance(saved, Tensor):
            raise ValueError("saved must be a torch.Tensor (empty for act='none')")
    elif act == "relu":
        _check(saved, "saved (relu bits)", torch.uint8, 2, (n, -(-f // 8)))
    else:
        _check(saved, "saved (pre-activation)", torch.float32, 2, (n, f))


def aggregate_forward(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor,
                      bias: Tensor | None = None, act: str = "none",
                      residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """out = act(A @ x + bias) + residual; returns (out [n, f], saved) as the reference."""
    code = activations.check_activation(act)
    n = _check_csr(rowptr, col, weight)
    _check(x, "x", torch.float32, 2)
    f = x.shape[1]
    if bias is not None:
        _check(bias, "bias", torch.float32, 1, (f,))
    if residual is not None:
        _check(residual, "residual", torch.float32, 2, (n, f))
    return _C.aggregate_forward(rowptr, col, weight, x, bias, code, residual)


def aggregate_backward(t_rowptr: Tensor, t_col: Tensor, t_weight: Tensor, grad_out: Tensor,
                       saved: Tensor, act: str) -> Tensor:
    """grad_x = A^T @ (grad_out * act'(pre)) over the transposed CSR; returns [m, f]."""
    code = activations.check_activation(act)
    _check_csr(t_rowptr, t_col, t_weight)
    _check(grad_out, "grad_out", torch.float32, 2)
    _check_saved(saved, act, *grad_out.shape)
    return _C.aggregate_backward(t_rowptr, t_col, t_weight, grad_out, saved, code)


def aggregate_tangents(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """A @ x[p] for every tangent p: x [P, m, f] -> [P, n, f]; one pass over the CSR for all
    tangents (an act "none" forward on x as [m, P * f])."""
    n = _check_csr(rowptr, col, weight)
    _check(x, "x", torch.float32, 3)
    P, m, f = x.shape
    out, _ = _C.aggregate_forward(rowptr, col, weight, x.permute(1, 0, 2).reshape(m, P * f), None,
                                  activations.ACT_CODES["none"], None)
    return out.view(n, P, f).permute(1, 0, 2).contiguous()


def edge_grad(rowptr: Tensor, col: Tensor, grad_out: Tensor, saved: Tensor, act: str,
              x: Tensor) -> Tensor:
    """SDDMM: d loss / d weight[e] = <grad_out[i] * act'(pre[i]), x[col[e]]>; returns [E]."""
    code = activations.check_activation(act)
    n = _check_csr(rowptr, col, None)
    _check(x, "x", torch.float32, 2)
    _check(grad_out, "grad_out", torch.float32, 2, (n, x.shape[1]))
    _check_saved(saved, act, n, x.shape[1])
    return _C.edge_grad(rowptr, col, grad_out, saved, code, x)


def propagate_forward(rowptr: Tensor, col: Tensor, x: Tensor, row_scale: Tensor | None = None,
                      self_x: Tensor | None = None, self_scale: Tensor | None = None,
                      bias: Tensor | None = None, act: str = "none", skip_loops: bool = False) -> Tensor:
    """out = act(s * (A_unit @ x) + t * self_x + bias); see the reference."""
    code = activations.check_activation(act)
    n = _check_csr(rowptr, col, None)
    _check(x, "x", torch.float32, 2)
    f = x.shape[1]
    for name, t, shape in (("row_scale", row_scale, (n,)), ("self_x", self_x, (n, f)),
                           ("self_scale", self_scale, (n,)), ("bias", bias, (f,))):
        if t is not None:
            _check(t, name, torch.float32, len(shape), shape)
    if self_scale is not None and self_x is None:
        raise ValueError("self_scale needs self_x")
    return _C.propagate_forward(rowptr, col, x, row_scale, self_x, self_scale, bias, code, bool(skip_loops))


def _check_entries(rowptr: Tensor, values: dict) -> None:
    """rowptr [n + 1] int64 and float32 [E, H] tensors of one shape (the extension checks rowptr's
    values)."""
    _check(rowptr, "rowptr", torch.int64, 1)
    if rowptr.numel() < 1:
        raise ValueError("rowptr must have n + 1 >= 1 entries")
    shape = None
    for name, t in values.items():
        _check(t, name, torch.float32, 2, shape)
        shape = tuple(t.shape)


def edge_softmax(rowptr: Tensor, logits: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Edge-weighted softmax per CSR row and head; returns (alpha, beta) [E, H] as the reference."""
    _check_entries(rowptr, {"logits": logits})
    _check(weight, "weight", torch.float32, 1, (logits.shape[0],))
    return _C.edge_softmax(rowptr, logits, weight)


def edge_softmax_backward(rowptr: Tensor, alpha: Tensor, beta: Tensor, grad_alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`edge_softmax`: (grad_logits [E, H], grad_weight [E]) as the reference."""
    _check_entries(rowptr, {"alpha": alpha, "beta": beta, "grad_alpha": grad_alpha})
    return _C.edge_softmax_backward(rowptr, alpha, beta, grad_alpha)
