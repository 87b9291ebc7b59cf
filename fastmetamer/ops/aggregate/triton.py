"""Triton CSR aggregation with fused epilogue, its backward and the edge gradient (SDDMM).

Same functions, signatures and saved-state format as :mod:`.reference` (the contract).
Kernels run on CUDA tensors on a GPU and on CPU tensors under ``TRITON_INTERPRET=1``.

Algorithms
----------
- ``aggregate_forward``: one program per (destination row, feature block). The program walks
  its row's edges ``rowptr[i]:rowptr[i+1]`` in chunks of ``BLOCK_E``, gathers the
  ``[BLOCK_E, BLOCK_F]`` tile of ``x[col]``, accumulates ``weight * x`` in fp32 (fp64 for fp64
  inputs), then applies bias, activation and residual in registers and writes ``out``. For relu
  it writes only the packed sign bits (the feature block is a multiple of 8, reshaped to
  ``[BLOCK_F/8, 8]`` and summed against ``1 << bit``); other activations write the
  pre-activation; ``none`` writes nothing. Deterministic (each output owned by one program).
- ``aggregate_backward``: the same row-wise kernel over the transposed CSR; for every edge the
  destination's ``grad_out`` tile is gathered and multiplied by ``act'`` recovered on the fly
  from the saved state (bits or pre-activation), so ``grad_pre`` is never materialised.
- ``edge_grad``: one program per block of ``BLOCK_E`` edges. The destination row of each edge is
  found by a vectorised binary search on ``rowptr`` (``ceil(log2 n)`` steps), then the program
  loops over feature blocks accumulating ``<grad_out[i] * act'(pre[i]), x[col[e]]>``.
- ``propagate_forward``: ``aggregate_forward``'s row sum (``row_aggregate``) with unit weights
  (self loops masked out when asked), then the per-row scale, the self term and the bias in
  registers.
"""
import os

import torch
from torch import Tensor

from .. import activations

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None

AVAILABLE = triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")

BLOCK_E = 16        # edges per chunk
MAX_BLOCK_F = 128   # features per program (a power of two >= 8)


def _block_f(f: int) -> int:
    return min(MAX_BLOCK_F, max(8, triton.next_power_of_2(max(f, 1))))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_available() -> None:
    if not AVAILABLE:
        raise RuntimeError("the triton backend needs triton and a CUDA device (or TRITON_INTERPRET=1)")


if triton is not None:

    @triton.jit
    def _expm1(x):
        # e^x - 1 to a few ulps of the result, also near 0 where exp(x) - 1 cancels (its error
        # would be ~1 ulp of 1, not of the result): Kahan's (u - 1) x / log(u) with u = e^x,
        # exact for u == 1 (then x itself); plain exp(x) - 1 where |x| >= 0.5 (no cancellation).
        u = tl.exp(x)
        um1 = u - 1.0
        lu = tl.log(u)
        small = tl.where(um1 == 0.0, x, um1 * (x / tl.where(lu == 0.0, 1.0, lu)))
        return tl.where(tl.abs(x) < 0.5, small, um1)

    @triton.jit
    def _tanh(x):
        # tanh(x) = -sign(x) m / (2 + m) with m = expm1(-2|x|): relative accuracy near 0 (no
        # 1 - e^{-2|x|} cancellation) and no overflow for large |x|.
        m = _expm1(-2.0 * tl.abs(x))
        y = -m / (2.0 + m)
        return tl.where(x < 0, -y, y)

    @triton.jit
    def act_fn(x, ACT: tl.constexpr):
        """Activation by code (see activations.ACTIVATIONS): none relu elu leaky_relu tanh gelu."""
        if ACT == 1:
            y = tl.where(x > 0, x, 0.0)
        elif ACT == 2:
            y = tl.where(x > 0, x, _expm1(tl.minimum(x, 0.0)))
        elif ACT == 3:
            y = tl.where(x > 0, x, x * 0.01)
        elif ACT == 4:
            y = _tanh(x)
        elif ACT == 5:
            y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        else:
            y = x
        return y

    @triton.jit
    def act_grad(x, ACT: tl.constexpr):
        """act'(x) (0 at 0 for relu), by activation code."""
        one = tl.full(x.shape, 1.0, x.dtype)
        if ACT == 1:
            y = tl.where(x > 0, one, 0.0)
        elif ACT == 2:
            y = tl.where(x > 0, one, tl.exp(tl.minimum(x, 0.0)))
        elif ACT == 3:
            y = tl.where(x > 0, one, tl.full(x.shape, 0.01, x.dtype))
        elif ACT == 4:
            t = _tanh(x)
            y = 1.0 - t * t
        elif ACT == 5:
            cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
            y = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
        else:
            y = one
        return y

    @triton.jit
    def _grad_pre_tile(gout_ptr, saved_ptr, rows, offs_f, mask, f, nbytes,
                       ACT: tl.constexpr, ACC: tl.constexpr):
        """grad_out[rows, offs_f] * act'(pre[rows, offs_f]) from the saved state."""
        g = tl.load(gout_ptr + rows[:, None] * f + offs_f[None, :], mask=mask, other=0.0).to(ACC)
        if ACT == 1:
            byte = tl.load(saved_ptr + rows[:, None] * nbytes + (offs_f[None, :] >> 3), mask=mask, other=0)
            bit = (byte.to(tl.int32) >> (offs_f[None, :] & 7).to(tl.int32)) & 1
            g = tl.where(bit != 0, g, 0.0)
        elif ACT != 0:
            pre = tl.load(saved_ptr + rows[:, None] * f + offs_f[None, :], mask=mask, other=0.0).to(ACC)
            g = g * act_grad(pre, ACT)
        return g

    @triton.jit
    def row_aggregate(rowptr_ptr, col_ptr, w_ptr, x_ptr, row, offs_f, fmask, f,
                      BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr,
                      UNIT: tl.constexpr = False, SKIP_LOOPS: tl.constexpr = False):
        """sum_{e in row} w[e] x[col[e], offs_f], accumulated in ACC: [BLOCK_F]; ``UNIT``: every
        w[e] = 1 (``w_ptr`` unread); ``SKIP_LOOPS``: the entries with col[e] == row left out."""
        start = tl.load(rowptr_ptr + row)
        end = tl.load(rowptr_ptr + row + 1)
        acc = tl.zeros([BLOCK_E, BLOCK_F], dtype=ACC)
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            emask = offs_e < end
            c = tl.load(col_ptr + offs_e, mask=emask, other=0).to(tl.int64)
            if SKIP_LOOPS:
                emask = emask & (c != row)
            xv = tl.load(x_ptr + c[:, None] * f + offs_f[None, :],
                         mask=emask[:, None] & fmask[None, :], other=0.0).to(ACC)
            if UNIT:
                acc += xv
            else:
                acc += tl.load(w_ptr + offs_e, mask=emask, other=0.0).to(ACC)[:, None] * xv
        return tl.sum(acc, axis=0)

    @triton.jit
    def _forward_kernel(rowptr_ptr, col_ptr, w_ptr, x_ptr, bias_ptr, res_ptr, out_ptr, saved_ptr,
                        f, nbytes,
                        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        fb = tl.program_id(1)
        offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        fmask = offs_f < f
        pre = row_aggregate(rowptr_ptr, col_ptr, w_ptr, x_ptr, row, offs_f, fmask, f, BLOCK_E, BLOCK_F, ACC)
        if HAS_BIAS:
            pre += tl.load(bias_ptr + offs_f, mask=fmask, other=0.0).to(ACC)
        out = act_fn(pre, ACT)
        if HAS_RES:
            out += tl.load(res_ptr + row * f + offs_f, mask=fmask, other=0.0).to(ACC)
        tl.store(out_ptr + row * f + offs_f, out, mask=fmask)
        if ACT == 1:
            pos = ((pre > 0) & fmask).to(tl.int32)
            pos = tl.reshape(pos, (BLOCK_F // 8, 8))
            byte = tl.sum(pos * (1 << tl.arange(0, 8))[None, :], axis=1)
            offs_b = fb * (BLOCK_F // 8) + tl.arange(0, BLOCK_F // 8)
            tl.store(saved_ptr + row * nbytes + offs_b, byte.to(tl.uint8), mask=offs_b < nbytes)
        elif ACT != 0:
            tl.store(saved_ptr + row * f + offs_f, pre, mask=fmask)

    @triton.jit
    def _backward_kernel(t_rowptr_ptr, t_col_ptr, t_w_ptr, gout_ptr, saved_ptr, out_ptr, f, nbytes,
                         ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
                         ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        fmask = offs_f < f
        start = tl.load(t_rowptr_ptr + row)
        end = tl.load(t_rowptr_ptr + row + 1)
        acc = tl.zeros([BLOCK_E, BLOCK_F], dtype=ACC)
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            emask = offs_e < end
            dst = tl.load(t_col_ptr + offs_e, mask=emask, other=0).to(tl.int64)
            w = tl.load(t_w_ptr + offs_e, mask=emask, other=0.0).to(ACC)
            g = _grad_pre_tile(gout_ptr, saved_ptr, dst, offs_f, emask[:, None] & fmask[None, :],
                               f, nbytes, ACT, ACC)
            acc += w[:, None] * g
        tl.store(out_ptr + row * f + offs_f, tl.sum(acc, axis=0), mask=fmask)

    @triton.jit
    def _edge_grad_kernel(rowptr_ptr, col_ptr, gout_ptr, saved_ptr, x_ptr, out_ptr,
                          n, num_edges, f, nbytes, search_steps,
                          ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
                          ACC: tl.constexpr):
        offs_e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
        emask = offs_e < num_edges
        # row of each edge: the largest r in [0, n) with rowptr[r] <= e (binary search).
        lo = tl.zeros([BLOCK_E], dtype=tl.int64)
        hi = lo + (n - 1)
        for _ in range(search_steps):
            mid = (lo + hi + 1) // 2
            v = tl.load(rowptr_ptr + mid, mask=emask, other=0)
            go = v <= offs_e
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        c = tl.load(col_ptr + offs_e, mask=emask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_E], dtype=ACC)
        for f0 in range(0, f, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask = emask[:, None] & (offs_f < f)[None, :]
            g = _grad_pre_tile(gout_ptr, saved_ptr, lo, offs_f, mask, f, nbytes, ACT, ACC)
            xv = tl.load(x_ptr + c[:, None] * f + offs_f[None, :], mask=mask, other=0.0).to(ACC)
            acc += tl.sum(g * xv, axis=1)
        tl.store(out_ptr + offs_e, acc, mask=emask)

    @triton.jit
    def _propagate_kernel(rowptr_ptr, col_ptr, x_ptr, scale_ptr, self_ptr, self_scale_ptr, bias_ptr, out_ptr, f,
                          HAS_SCALE: tl.constexpr, HAS_SELF: tl.constexpr, HAS_SELF_SCALE: tl.constexpr,
                          HAS_BIAS: tl.constexpr, SKIP_LOOPS: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        fmask = offs_f < f
        pre = row_aggregate(rowptr_ptr, col_ptr, x_ptr, x_ptr, row, offs_f, fmask, f, BLOCK_E, BLOCK_F, ACC,
                            UNIT=True, SKIP_LOOPS=SKIP_LOOPS)
        if HAS_SCALE:
            pre = pre * tl.load(scale_ptr + row).to(ACC)
        if HAS_SELF:
            own = tl.load(self_ptr + row * f + offs_f, mask=fmask, other=0.0).to(ACC)
            if HAS_SELF_SCALE:
                own = own * tl.load(self_scale_ptr + row).to(ACC)
            pre += own
        if HAS_BIAS:
            pre += tl.load(bias_ptr + offs_f, mask=fmask, other=0.0).to(ACC)
        tl.store(out_ptr + row * f + offs_f, act_fn(pre, ACT), mask=fmask)


def _dtype(*tensors: Tensor | None) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def aggregate_forward(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor,
                      bias: Tensor | None = None, act: str = "none",
                      residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """out = act(A @ x + bias) + residual; see :func:`.reference.aggregate_forward`."""
    _check_available()
    code = activations.check_activation(act)
    dtype = _dtype(x, weight, bias, residual)
    n, f = rowptr.numel() - 1, x.shape[1]
    x = x.contiguous()
    out = torch.empty(n, f, dtype=dtype, device=x.device)
    nbytes = -(-f // 8)
    if act == "none":
        saved = torch.empty(0, dtype=dtype, device=x.device)
    elif act == "relu":
        saved = torch.empty(n, nbytes, dtype=torch.uint8, device=x.device)
    else:
        saved = torch.empty(n, f, dtype=dtype, device=x.device)
    if n == 0 or f == 0:
        if act == "relu":
            saved.zero_()
        return out, saved
    block_f = _block_f(f)
    bias_arg = bias.contiguous() if bias is not None else out
    res_arg = residual.contiguous() if residual is not None else out
    grid = (n, triton.cdiv(f, block_f))
    _forward_kernel[grid](rowptr.contiguous(), col.contiguous(), weight.contiguous(), x, bias_arg, res_arg,
                          out, saved, f, nbytes,
                          HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=code,
                          BLOCK_E=BLOCK_E, BLOCK_F=block_f, ACC=_acc_dtype(dtype))
    return out, saved


def _saved_arg(saved: Tensor, act: str, grad_out: Tensor) -> Tensor:
    if act == "none":
        return grad_out  # never read
    return saved.contiguous()


def aggregate_backward(t_rowptr: Tensor, t_col: Tensor, t_weight: Tensor, grad_out: Tensor,
                       saved: Tensor, act: str) -> Tensor:
    """grad_x = A^T @ (grad_out * act'(pre)); see :func:`.reference.aggregate_backward`."""
    _check_available()
    code = activations.check_activation(act)
    dtype = _dtype(grad_out, t_weight, saved if act not in ("none", "relu") else None)
    m, f = t_rowptr.numel() - 1, grad_out.shape[1]
    grad_out = grad_out.contiguous()
    out = torch.empty(m, f, dtype=dtype, device=grad_out.device)
    if m == 0 or f == 0:
        return out
    block_f = _block_f(f)
    grid = (m, triton.cdiv(f, block_f))
    _backward_kernel[grid](t_rowptr.contiguous(), t_col.contiguous(), t_weight.contiguous(), grad_out,
                           _saved_arg(saved, act, grad_out), out, f, -(-f // 8),
                           ACT=code, BLOCK_E=BLOCK_E, BLOCK_F=block_f, ACC=_acc_dtype(dtype))
    return out


def edge_grad(rowptr: Tensor, col: Tensor, grad_out: Tensor, saved: Tensor, act: str,
              x: Tensor) -> Tensor:
    """SDDMM d loss / d weight[e]; see :func:`.reference.edge_grad`. Returns [E]."""
    _check_available()
    code = activations.check_activation(act)
    dtype = _dtype(grad_out, x, saved if act not in ("none", "relu") else None)
    n, num_edges, f = rowptr.numel() - 1, col.numel(), grad_out.shape[1]
    out = torch.empty(num_edges, dtype=dtype, device=grad_out.device)
    if num_edges == 0:
        return out
    if f == 0:
        return out.zero_()
    grad_out = grad_out.contiguous()
    block_e = 32
    grid = (triton.cdiv(num_edges, block_e),)
    _edge_grad_kernel[grid](rowptr.contiguous(), col.contiguous(), grad_out,
                            _saved_arg(saved, act, grad_out), x.contiguous(), out,
                            n, num_edges, f, -(-f // 8), max(n - 1, 0).bit_length(),
                            ACT=code, BLOCK_E=block_e, BLOCK_F=min(64, _block_f(f)), ACC=_acc_dtype(dtype))
    return out


def propagate_forward(rowptr: Tensor, col: Tensor, x: Tensor, row_scale: Tensor | None = None,
                      self_x: Tensor | None = None, self_scale: Tensor | None = None,
                      bias: Tensor | None = None, act: str = "none", skip_loops: bool = False) -> Tensor:
    """out = act(s * (A_unit @ x) + t * self_x + bias); see :func:`.reference.propagate_forward`."""
    _check_available()
    code = activations.check_activation(act)
    if self_scale is not None and self_x is None:
        raise ValueError("self_scale needs self_x")
    dtype = _dtype(x, row_scale, self_x, self_scale, bias)
    n, f = rowptr.numel() - 1, x.shape[1]
    out = torch.empty(n, f, dtype=dtype, device=x.device)
    if n == 0 or f == 0:
        return out
    block_f = _block_f(f)

    def arg(t):
        return out if t is None else t.contiguous()

    _propagate_kernel[(n, triton.cdiv(f, block_f))](
        rowptr.contiguous(), col.contiguous(), x.contiguous(), arg(row_scale), arg(self_x), arg(self_scale),
        arg(bias), out, f, HAS_SCALE=row_scale is not None, HAS_SELF=self_x is not None,
        HAS_SELF_SCALE=self_scale is not None, HAS_BIAS=bias is not None, SKIP_LOOPS=bool(skip_loops), ACT=code,
        BLOCK_E=BLOCK_E, BLOCK_F=block_f, ACC=_acc_dtype(dtype))
    return out
