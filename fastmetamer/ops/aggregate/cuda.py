"""CUDA C++ CSR aggregation with fused epilogue, its backward, edge gradient, unit-weight
propagation and batched tangents (``csrc/cuda/aggregate.cu``).

Same functions, signatures and saved-state format as :mod:`fastmetamer.ops.aggregate.reference`
(the contract); float32 data and int64 indices, contiguous, all on one CUDA device. Inputs are
validated here (ValueError): types, devices, contiguity and shapes on the host, then the CSR
structure (rowptr[0] == 0, rowptr[-1] == E, non-decreasing, col in [0, m)) by torch ops on the
device, read back with one synchronisation the first time a CSR is seen (the same tensors,
unchanged, are not checked again: no host synchronisation per step). Outputs are allocated with torch on the
inputs' device; the kernels run on its current stream.

How the kernels are organised (``csrc/cuda/common.cuh``, "CSR row scheduling"): every op launches
two kernels of 256 threads over all rows, each skipping the other's rows, so no host-side row
lists. Rows of degree <= 512 get a warp each; lanes hold consecutive features (feature f0 + lane
+ 32 k, k < 8: tiles of 256 features, f > 256 loops over tiles), so every gathered row x[col[e]]
is read coalesced, and each 32-edge chunk's col / weight is loaded once and broadcast by shuffles.
Rows of degree > 512 (power-law hubs) get a whole block: its 8 warps take strided 32-edge chunks
and their partial sums are added in warp order in shared memory. Every sum runs in a fixed order
with no atomics, so results are bitwise identical run to run. The epilogue (bias, activation,
residual, saved pre-activation or relu bits packed by warp ballots) is fused into the writing
kernel. ``aggregate_backward`` gathers over the transposed CSR with act' recomputed from the saved
state per gathered entry; ``edge_grad`` (SDDMM) holds a row's grad_pre tile in registers and sums
each edge's dot product (double) over the warp by a butterfly; ``aggregate_tangents`` treats the
P * f (tangent, feature) pairs as one row's features, so one pass over the CSR serves all tangents.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .. import activations, cuda_library
from ..checks import check_tensor
from ..memo import Memo

AVAILABLE = cuda_library.available()


_check = partial(check_tensor, backend="cuda")


def _check_csr(rowptr: Tensor, col: Tensor, weight: Tensor | None) -> tuple[int, torch.device]:
    """Check the CSR tensors' types (not their contents: :func:`_csr_conditions`); returns (n, device)."""
    device = _check(rowptr, "rowptr", torch.int64, 1)
    if rowptr.numel() < 1:
        raise ValueError("rowptr must have n + 1 >= 1 entries")
    _check(col, "col", torch.int64, 1, device=device)
    if weight is not None:
        _check(weight, "weight", torch.float32, 1, (col.numel(),), device)
    return rowptr.numel() - 1, device


def _csr_conditions(rowptr: Tensor, col: Tensor, m: int) -> list[tuple[Tensor, str]]:
    """The CSR structure as (0-d bool tensor on the device, message if False) pairs for :func:`_verify`."""
    num_edges = col.numel()
    return [((rowptr[0] == 0) & (rowptr[-1] == num_edges),
             f"rowptr must start at 0 and end at col.numel() = {num_edges}"),
            ((rowptr[1:] >= rowptr[:-1]).all(), "rowptr must be non-decreasing"),
            (((col >= 0) & (col < m)).all(), f"col entries must lie in [0, {m})")]


_CHECKED = Memo(64)


def _verify_once(tensors: tuple[Tensor, ...], sizes: tuple, conditions) -> None:
    """:func:`_verify` of ``conditions()`` unless these very ``tensors``, unchanged, passed it with
    these ``sizes`` before: the engine hands the same cached CSR to every step, so the step loop
    pays the host synchronisation of the structure check once, not per call."""
    _CHECKED.get(list(tensors), sizes, lambda: _verify(conditions()))


def _verify(conditions: list[tuple[Tensor, str]]) -> None:
    """Read the device conditions back with one synchronisation; ValueError for the first false one."""
    for ok, (_, message) in zip(torch.stack([c for c, _ in conditions]).tolist(), conditions):
        if not ok:
            raise ValueError(message)


def _check_saved(saved: Tensor, act: str, n: int, f: int, device: torch.device) -> None:
    if act == "none":
        if not isinstance(saved, Tensor):
            raise ValueError("saved must be a torch.Tensor (empty for act='none')")
    elif act == "relu":
        _check(saved, "saved (relu bits)", torch.uint8, 2, (n, -(-f // 8)), device)
    else:
        _check(saved, "saved (pre-activation)", torch.float32, 2, (n, f), device)


def aggregate_forward(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor,
                      bias: Tensor | None = None, act: str = "none",
                      residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """out = act(A @ x + bias) + residual; returns (out [n, f], saved) as the reference."""
    code = activations.check_activation(act)
    n, device = _check_csr(rowptr, col, weight)
    _check(x, "x", torch.float32, 2, device=device)
    m, f = x.shape
    if bias is not None:
        _check(bias, "bias", torch.float32, 1, (f,), device)
    if residual is not None:
        _check(residual, "residual", torch.float32, 2, (n, f), device)
    _verify_once((rowptr, col), (m,), lambda: _csr_conditions(rowptr, col, m))
    out = torch.empty(n, f, dtype=torch.float32, device=device)
    if act == "none":
        saved = torch.empty(0, dtype=torch.float32, device=device)
    elif act == "relu":
        saved = torch.empty(n, -(-f // 8), dtype=torch.uint8, device=device)
    else:
        saved = torch.empty(n, f, dtype=torch.float32, device=device)
    cuda_library.call("aggregate_forward", rowptr, col, weight, x, bias, residual, out, saved, n, f, code)
    return out, saved


def aggregate_backward(t_rowptr: Tensor, t_col: Tensor, t_weight: Tensor, grad_out: Tensor,
                       saved: Tensor, act: str) -> Tensor:
    """grad_x = A^T @ (grad_out * act'(pre)) over the transposed CSR; returns [m, f]."""
    code = activations.check_activation(act)
    m, device = _check_csr(t_rowptr, t_col, t_weight)
    _check(grad_out, "grad_out", torch.float32, 2, device=device)
    n, f = grad_out.shape
    _check_saved(saved, act, n, f, device)
    _verify_once((t_rowptr, t_col), (n,), lambda: _csr_conditions(t_rowptr, t_col, n))
    grad_x = torch.empty(m, f, dtype=torch.float32, device=device)
    cuda_library.call("aggregate_backward", t_rowptr, t_col, t_weight, grad_out, saved if act != "none" else None,
            grad_x, m, f, code)
    return grad_x


def edge_grad(rowptr: Tensor, col: Tensor, grad_out: Tensor, saved: Tensor, act: str,
              x: Tensor) -> Tensor:
    """SDDMM: d loss / d weight[e] = <grad_out[i] * act'(pre[i]), x[col[e]]>; returns [E]."""
    code = activations.check_activation(act)
    n, device = _check_csr(rowptr, col, None)
    _check(x, "x", torch.float32, 2, device=device)
    m, f = x.shape
    _check(grad_out, "grad_out", torch.float32, 2, (n, f), device)
    _check_saved(saved, act, n, f, device)
    _verify_once((rowptr, col), (m,), lambda: _csr_conditions(rowptr, col, m))
    out = torch.empty(col.numel(), dtype=torch.float32, device=device)
    cuda_library.call("edge_grad", rowptr, col, grad_out, saved if act != "none" else None, x, out, n, f, code)
    return out


def propagate_forward(rowptr: Tensor, col: Tensor, x: Tensor, row_scale: Tensor | None = None,
                      self_x: Tensor | None = None, self_scale: Tensor | None = None,
                      bias: Tensor | None = None, act: str = "none", skip_loops: bool = False) -> Tensor:
    """out = act(s * (A_unit @ x) + t * self_x + bias); see the reference."""
    code = activations.check_activation(act)
    n, device = _check_csr(rowptr, col, None)
    _check(x, "x", torch.float32, 2, device=device)
    m, f = x.shape
    for name, t, shape in (("row_scale", row_scale, (n,)), ("self_x", self_x, (n, f)),
                           ("self_scale", self_scale, (n,)), ("bias", bias, (f,))):
        if t is not None:
            _check(t, name, torch.float32, len(shape), shape, device)
    if self_scale is not None and self_x is None:
        raise ValueError("self_scale needs self_x")
    _verify_once((rowptr, col), (m,), lambda: _csr_conditions(rowptr, col, m))
    out = torch.empty(n, f, dtype=torch.float32, device=device)
    cuda_library.call("propagate_forward", rowptr, col, x, row_scale, self_x, self_scale, bias, out, n, f, code,
            bool(skip_loops))
    return out


def aggregate_tangents(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """A @ x[p] for every tangent p: x [P, m, f] -> [P, n, f], one pass over the CSR."""
    n, device = _check_csr(rowptr, col, weight)
    _check(x, "x", torch.float32, 3, device=device)
    P, m, f = x.shape
    _verify_once((rowptr, col), (m,), lambda: _csr_conditions(rowptr, col, m))
    out = torch.empty(P, n, f, dtype=torch.float32, device=device)
    cuda_library.call("aggregate_tangents", rowptr, col, weight, x, out, n, m, f, P)
    return out


def _check_rows(rowptr: Tensor, values: dict) -> torch.device:
    """rowptr [n + 1] int64 and float32 [E, H] tensors of one shape on one device; rowptr's
    structure (0 .. E, non-decreasing) checked once per tensor on the device."""
    device = _check(rowptr, "rowptr", torch.int64, 1)
    if rowptr.numel() < 1:
        raise ValueError("rowptr must have n + 1 >= 1 entries")
    shape = None
    for name, t in values.items():
        _check(t, name, torch.float32, 2, shape, device)
        shape = tuple(t.shape)
    num_entries = shape[0]
    _verify_once((rowptr,), (num_entries,), lambda: [
        ((rowptr[0] == 0) & (rowptr[-1] == num_entries), f"rowptr must start at 0 and end at the {num_entries} entries"),
        ((rowptr[1:] >= rowptr[:-1]).all(), "rowptr must be non-decreasing")])
    return device


def edge_softmax(rowptr: Tensor, logits: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Edge-weighted softmax per CSR row and head; returns (alpha, beta) [E, H] as the reference."""
    device = _check_rows(rowptr, {"logits": logits})
    _check(weight, "weight", torch.float32, 1, (logits.shape[0],), device)
    alpha, beta = torch.empty_like(logits), torch.empty_like(logits)
    cuda_library.call("edge_softmax", rowptr, logits, weight, alpha, beta, rowptr.numel() - 1, logits.shape[1])
    return alpha, beta


def edge_softmax_backward(rowptr: Tensor, alpha: Tensor, beta: Tensor, grad_alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`edge_softmax`: (grad_logits [E, H], grad_weight [E]) as the reference."""
    _check_rows(rowptr, {"alpha": alpha, "beta": beta, "grad_alpha": grad_alpha})
    grad_logits = torch.empty_like(alpha)
    grad_weight = torch.empty(alpha.shape[0], dtype=torch.float32, device=alpha.device)
    cuda_library.call("edge_softmax_backward", rowptr, alpha, beta, grad_alpha, grad_logits, grad_weight,
                      rowptr.numel() - 1, alpha.shape[1])
    return grad_logits, grad_weight
