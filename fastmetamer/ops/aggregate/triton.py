"""Triton CSR aggregation with fused epilogue, its backward, the edge gradient (SDDMM), unit-weight
propagation and batched tangents.

Same functions, signatures and saved-state format as :mod:`.reference` (the contract).
Kernels run on CUDA tensors on a GPU and on CPU tensors under ``TRITON_INTERPRET=1``.

Load balance: the chunk plan
----------------------------
No program walks a hub's edges alone. Each row is cut into ``max(1, ceil(deg / SPLIT))`` chunks of
at most ``SPLIT`` consecutive edges (:func:`_plan`, torch ops on the device, memoised per
``rowptr`` object). A program takes ``BLOCK_R`` consecutive chunks and one block of ``BLOCK_F``
features and sums each chunk's edges ``BLOCK_E`` at a time (a gathered tile of
``[BLOCK_R, BLOCK_E, BLOCK_F]``) in fp32 (fp64 for fp64 inputs).

- Pass 1 (``COMBINE=False``, items = chunks): the only chunk of a row applies the fused epilogue
  and writes the row; a chunk of a split (hub) row stores its partial sum in ``part[slot]``.
- Pass 2 (``COMBINE=True``, items = hub rows): each hub row sums its chunks' partials in chunk
  order and applies the same epilogue.

Every output is written by one program in a fixed order (no float atomics): results are bitwise
deterministic. No host synchronisation: the grids and buffers are sized by bounds known from the
shapes alone -- at most ``n + E // SPLIT`` chunks, ``E // (SPLIT + 1)`` hub rows and
``2 E // SPLIT`` partials -- and padding items (row -1) do nothing.

Epilogues
---------
- ``aggregate_forward``: bias, activation and residual in registers; for relu only the packed
  sign bits are saved (``[BLOCK_R, BLOCK_F / 8, 8]`` summed against ``1 << bit``), other
  activations save the pre-activation, ``none`` nothing.
- ``aggregate_backward``: the same plan over the transposed CSR; each gathered ``grad_out`` row is
  multiplied by ``act'`` recovered from the saved state (bits or pre-activation), so
  ``grad_pre`` is never materialised.
- ``propagate_forward``: unit weights (self loops masked out when asked), then the per-row scale,
  the self term, the bias and the activation.
- ``aggregate_tangents``: the P tangents as one ``[m, P * f]`` operand of a plain forward, so the
  CSR is read once for all of them.
- ``edge_grad``: one program per ``EDGE_BLOCK`` edges (balanced whatever the degrees); each edge's
  row is found by a vectorised binary search on ``rowptr``, then the program loops over feature
  blocks accumulating ``<grad_out[i] * act'(pre[i]), x[col[e]]>``.
- ``edge_softmax`` / ``edge_softmax_backward``: one program per row (all heads), walking the
  row's entries ``SOFTMAX_BLOCK_E`` at a time (three passes forward: maximum, denominator, write;
  two backward). A hub row is walked by its one program (no split: the work per entry is a few
  flops on H numbers).
"""
import os

import torch
from torch import Tensor

from .. import activations
from ..memo import Memo

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None

AVAILABLE = triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")

SPLIT = 256         # most edges of one row summed by one program (longer rows are split)
BLOCK_E = 8         # edges per step of a chunk
MAX_BLOCK_F = 128   # features per program (a power of two >= 8)
TILE = 4096         # elements of a program's gathered tile: BLOCK_R * BLOCK_E * BLOCK_F
EDGE_BLOCK = 32     # edges per program in edge_grad
SOFTMAX_BLOCK_E = 32  # entries per step of the edge softmax
MAX_EXPONENT = 60.0   # as the reference's edge softmax
SOFTMAX_EPS = 1e-16
NUM_WARPS = 8       # warps per program of the plan kernels


def _block_f(f: int) -> int:
    return min(MAX_BLOCK_F, max(8, triton.next_power_of_2(max(f, 1))))


def _block_r(block_f: int) -> int:
    return min(32, TILE // (BLOCK_E * block_f))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_available() -> None:
    if not AVAILABLE:
        raise RuntimeError("the triton backend needs triton and a CUDA device (or TRITON_INTERPRET=1)")


_MEMO = Memo()


def _plan(rowptr: Tensor, num_edges: int) -> tuple[tuple, tuple, int]:
    """The chunk plan of a CSR (see the module docstring), memoised per ``rowptr`` object.

    Returns (chunks, hubs, num_slots): chunks = (row, lo, hi, slot) [n + E // SPLIT], the edge range
    [lo, hi) of each chunk, its row (-1: padding) and its partial's slot (-1: the row's only chunk);
    hubs = (row, lo, hi, row) [E // (SPLIT + 1)], each split row and the slot range [lo, hi) of its
    partials (row -1: padding; the row again stands in for the slots, which pass 2 does not read);
    num_slots = 2 E // SPLIT, a bound on the partials.
    """
    def build():
        n, device = rowptr.numel() - 1, rowptr.device
        ptr = rowptr.to(torch.long)
        count = ((ptr.diff() + (SPLIT - 1)) // SPLIT).clamp_(min=1)  # chunks per row
        end = count.cumsum(0)
        q = torch.arange(n + num_edges // SPLIT, device=device)
        row = torch.searchsorted(end, q, right=True)
        valid = row < n
        r = row.clamp(max=n - 1)
        j = q - (end - count)[r]                                    # chunk index within its row
        lo = torch.where(valid, ptr[r] + j * SPLIT, 0)
        hi = torch.where(valid, torch.minimum(lo + SPLIT, ptr[r + 1]), 0)
        split = count > 1
        hub_count = torch.where(split, count, 0)
        hub_end = hub_count.cumsum(0)
        slot = torch.where(valid & split[r], (hub_end - hub_count)[r] + j, -1)
        h_row = torch.searchsorted(split.cumsum(0), torch.arange(num_edges // (SPLIT + 1), device=device),
                                   right=True)
        h_valid = h_row < n
        h = h_row.clamp(max=n - 1)
        h_row = torch.where(h_valid, h_row, -1)
        hubs = (h_row, torch.where(h_valid, (hub_end - hub_count)[h], 0), torch.where(h_valid, hub_end[h], 0), h_row)
        return (torch.where(valid, row, -1), lo, hi, slot), hubs, 2 * num_edges // SPLIT

    return _MEMO.get([rowptr], ("plan", num_edges), build)


def _run(kernel, rowptr: Tensor, num_edges: int, f: int, dtype: torch.dtype, args: tuple,
         feature_grid: bool = True, **meta) -> None:
    """Launch ``kernel`` over the chunk plan of ``rowptr`` (pass 1) then over its split rows
    (pass 2); ``feature_grid``: one program per feature block (else the kernel loops over them)."""
    chunks, hubs, num_slots = _plan(rowptr, num_edges)
    block_f = _block_f(f)
    block_r = _block_r(block_f)
    part = torch.empty(num_slots, f, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                       device=rowptr.device)
    for items, combine in ((chunks, False), (hubs, True)):
        num_items = items[0].numel()
        if num_items:
            grid = (triton.cdiv(num_items, block_r), triton.cdiv(f, block_f) if feature_grid else 1)
            kernel[grid](*items, num_items, part, *args, COMBINE=combine, BLOCK_R=block_r, BLOCK_E=BLOCK_E,
                         BLOCK_F=block_f, ACC=_acc_dtype(dtype), num_warps=NUM_WARPS, **meta)


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
    def _grad_pre(gout_ptr, saved_ptr, rows, offs_f, mask, f, nbytes, ACT: tl.constexpr, ACC: tl.constexpr):
        """grad_out[rows, offs_f] * act'(pre[rows, offs_f]) from the saved state; ``rows`` and
        ``offs_f`` broadcast to ``mask``'s shape."""
        g = tl.load(gout_ptr + rows * f + offs_f, mask=mask, other=0.0).to(ACC)
        if ACT == 1:
            byte = tl.load(saved_ptr + rows * nbytes + (offs_f >> 3), mask=mask, other=0)
            bit = (byte.to(tl.int32) >> (offs_f & 7).to(tl.int32)) & 1
            g = tl.where(bit != 0, g, 0.0)
        elif ACT != 0:
            pre = tl.load(saved_ptr + rows * f + offs_f, mask=mask, other=0.0).to(ACC)
            g = g * act_grad(pre, ACT)
        return g

    @triton.jit
    def _segment_sum(rows, lo, hi, col_ptr, w_ptr, src_ptr, saved_ptr, offs_f, fmask, f, nbytes,
                     GATHER: tl.constexpr, WEIGHTED: tl.constexpr, SKIP_LOOPS: tl.constexpr,
                     GRAD_ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_F: tl.constexpr, ACC: tl.constexpr):
        """[BLOCK_R, BLOCK_F]: sum over e in [lo, hi) of w[e] * src[c(e), offs_f] with c = col[e]
        (``GATHER``) or e; w = 1 unless ``WEIGHTED``; ``SKIP_LOOPS``: entries with c == row left
        out; ``GRAD_ACT`` >= 0: src is grad_out times act' of that code (:func:`_grad_pre`)."""
        acc = tl.zeros([BLOCK_R, BLOCK_F], dtype=ACC)
        span = tl.max(hi - lo, axis=0)
        for e0 in range(0, span, BLOCK_E):
            offs_e = lo[:, None] + e0 + tl.arange(0, BLOCK_E)[None, :]
            emask = offs_e < hi[:, None]
            if GATHER:
                c = tl.load(col_ptr + offs_e, mask=emask, other=0).to(tl.int64)
            else:
                c = offs_e
            if SKIP_LOOPS:
                emask = emask & (c != rows[:, None])
            mask = emask[:, :, None] & fmask[None, None, :]
            if GRAD_ACT >= 0:
                v = _grad_pre(src_ptr, saved_ptr, c[:, :, None], offs_f[None, None, :], mask, f, nbytes,
                              GRAD_ACT, ACC)
            else:
                v = tl.load(src_ptr + c[:, :, None] * f + offs_f[None, None, :], mask=mask, other=0.0).to(ACC)
            if WEIGHTED:
                v = v * tl.load(w_ptr + offs_e, mask=emask, other=0.0).to(ACC)[:, :, None]
            acc += tl.sum(v, axis=1)
        return acc

    @triton.jit
    def plan_items(row_ptr, lo_ptr, hi_ptr, slot_ptr, num_items, COMBINE: tl.constexpr, BLOCK_R: tl.constexpr):
        """This program's items of the plan: (rows, lo, hi, slot, done) [BLOCK_R]; ``done``: the
        item finishes its row (applies the epilogue)."""
        items = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        imask = items < num_items
        rows = tl.load(row_ptr + items, mask=imask, other=-1)
        lo = tl.load(lo_ptr + items, mask=imask, other=0)
        hi = tl.load(hi_ptr + items, mask=imask, other=0)
        if COMBINE:
            slot = tl.full([BLOCK_R], -1, tl.int64)
        else:
            slot = tl.load(slot_ptr + items, mask=imask, other=-1)
        return rows, lo, hi, slot, (rows >= 0) & (slot < 0)

    @triton.jit
    def plan_sum(rows, lo, hi, slot, part_ptr, col_ptr, w_ptr, src_ptr, saved_ptr, offs_f, fmask, f, nbytes,
                 COMBINE: tl.constexpr, WEIGHTED: tl.constexpr, SKIP_LOOPS: tl.constexpr, GRAD_ACT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr):
        """[BLOCK_R, BLOCK_F] sums of the items (``plan_items``): pass 1 sums each chunk's edges and
        stores a split row's chunk sum in part[slot]; pass 2 (``COMBINE``) sums a split row's
        partials in chunk order."""
        if COMBINE:
            acc = _segment_sum(rows, lo, hi, col_ptr, w_ptr, part_ptr, saved_ptr, offs_f, fmask, f, nbytes,
                               False, False, False, -1, BLOCK_R, BLOCK_E, BLOCK_F, ACC)
        else:
            acc = _segment_sum(rows, lo, hi, col_ptr, w_ptr, src_ptr, saved_ptr, offs_f, fmask, f, nbytes,
                               True, WEIGHTED, SKIP_LOOPS, GRAD_ACT, BLOCK_R, BLOCK_E, BLOCK_F, ACC)
            tl.store(part_ptr + slot[:, None] * f + offs_f[None, :], acc,
                     mask=(slot >= 0)[:, None] & fmask[None, :])
        return acc

    @triton.jit
    def _forward_kernel(row_ptr, lo_ptr, hi_ptr, slot_ptr, num_items, part_ptr,
                        col_ptr, w_ptr, x_ptr, bias_ptr, res_ptr, out_ptr, saved_ptr, f, nbytes,
                        COMBINE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr):
        fb = tl.program_id(1)
        offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        fmask = offs_f < f
        rows, lo, hi, slot, done = plan_items(row_ptr, lo_ptr, hi_ptr, slot_ptr, num_items, COMBINE, BLOCK_R)
        pre = plan_sum(rows, lo, hi, slot, part_ptr, col_ptr, w_ptr, x_ptr, x_ptr, offs_f, fmask, f, nbytes,
                       COMBINE, True, False, -1, BLOCK_R, BLOCK_E, BLOCK_F, ACC)
        mask = done[:, None] & fmask[None, :]
        dst = rows[:, None] * f + offs_f[None, :]
        if HAS_BIAS:
            pre += tl.load(bias_ptr + offs_f, mask=fmask, other=0.0).to(ACC)[None, :]
        out = act_fn(pre, ACT)
        if HAS_RES:
            out += tl.load(res_ptr + dst, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + dst, out, mask=mask)
        if ACT == 1:
            pos = tl.reshape(((pre > 0) & fmask[None, :]).to(tl.int32), (BLOCK_R, BLOCK_F // 8, 8))
            byte = tl.sum(pos * (1 << tl.arange(0, 8))[None, None, :], axis=2)
            offs_b = fb * (BLOCK_F // 8) + tl.arange(0, BLOCK_F // 8)
            tl.store(saved_ptr + rows[:, None] * nbytes + offs_b[None, :], byte.to(tl.uint8),
                     mask=done[:, None] & (offs_b < nbytes)[None, :])
        elif ACT != 0:
            tl.store(saved_ptr + dst, pre, mask=mask)

    @triton.jit
    def _backward_kernel(row_ptr, lo_ptr, hi_ptr, slot_ptr, num_items, part_ptr,
                         t_col_ptr, t_w_ptr, gout_ptr, saved_ptr, out_ptr, f, nbytes,
                         COMBINE: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_F: tl.constexpr, ACC: tl.constexpr):
        offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        fmask = offs_f < f
        rows, lo, hi, slot, done = plan_items(row_ptr, lo_ptr, hi_ptr, slot_ptr, num_items, COMBINE, BLOCK_R)
        acc = plan_sum(rows, lo, hi, slot, part_ptr, t_col_ptr, t_w_ptr, gout_ptr, saved_ptr, offs_f, fmask, f,
                       nbytes, COMBINE, True, False, ACT, BLOCK_R, BLOCK_E, BLOCK_F, ACC)
        tl.store(out_ptr + rows[:, None] * f + offs_f[None, :], acc, mask=done[:, None] & fmask[None, :])

    @triton.jit
    def _propagate_kernel(row_ptr, lo_ptr, hi_ptr, slot_ptr, num_items, part_ptr,
                          col_ptr, x_ptr, scale_ptr, self_ptr, self_scale_ptr, bias_ptr, out_ptr, f,
                          COMBINE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SELF: tl.constexpr,
                          HAS_SELF_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SKIP_LOOPS: tl.constexpr,
                          ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
                          ACC: tl.constexpr):
        offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        fmask = offs_f < f
        rows, lo, hi, slot, done = plan_items(row_ptr, lo_ptr, hi_ptr, slot_ptr, num_items, COMBINE, BLOCK_R)
        pre = plan_sum(rows, lo, hi, slot, part_ptr, col_ptr, x_ptr, x_ptr, x_ptr, offs_f, fmask, f, 0,
                       COMBINE, False, SKIP_LOOPS, -1, BLOCK_R, BLOCK_E, BLOCK_F, ACC)
        mask = done[:, None] & fmask[None, :]
        dst = rows[:, None] * f + offs_f[None, :]
        if HAS_SCALE:
            pre = pre * tl.load(scale_ptr + rows, mask=done, other=0.0).to(ACC)[:, None]
        if HAS_SELF:
            own = tl.load(self_ptr + dst, mask=mask, other=0.0).to(ACC)
            if HAS_SELF_SCALE:
                own = own * tl.load(self_scale_ptr + rows, mask=done, other=0.0).to(ACC)[:, None]
            pre += own
        if HAS_BIAS:
            pre += tl.load(bias_ptr + offs_f, mask=fmask, other=0.0).to(ACC)[None, :]
        tl.store(out_ptr + dst, act_fn(pre, ACT), mask=mask)

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
            g = _grad_pre(gout_ptr, saved_ptr, lo[:, None], offs_f[None, :], mask, f, nbytes, ACT, ACC)
            xv = tl.load(x_ptr + c[:, None] * f + offs_f[None, :], mask=mask, other=0.0).to(ACC)
            acc += tl.sum(g * xv, axis=1)
        tl.store(out_ptr + offs_e, acc, mask=emask)


    @triton.jit
    def _softmax_tile(rowptr_ptr, H, BLOCK_H: tl.constexpr):
        """(lo, hi, head offsets, head mask) of this program's row."""
        row = tl.program_id(0)
        lo = tl.load(rowptr_ptr + row)
        hi = tl.load(rowptr_ptr + row + 1)
        offs_h = tl.arange(0, BLOCK_H)
        return lo, hi, offs_h, offs_h < H

    @triton.jit
    def _edge_softmax_kernel(rowptr_ptr, logit_ptr, w_ptr, alpha_ptr, beta_ptr, H,
                             BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
        lo, hi, offs_h, hmask = _softmax_tile(rowptr_ptr, H, BLOCK_H)
        top = tl.full([BLOCK_H], float("-inf"), ACC)
        for start in range(lo, hi, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            w = tl.load(w_ptr + e, mask=e < hi, other=0.0).to(ACC)
            mask = ((e < hi) & (w > 0))[:, None] & hmask[None, :]
            logit = tl.load(logit_ptr + e[:, None] * H + offs_h[None, :], mask=mask, other=float("-inf")).to(ACC)
            top = tl.maximum(top, tl.max(logit, axis=0))
        top = tl.where(top == float("-inf"), 0.0, top)
        denom = tl.zeros([BLOCK_H], dtype=ACC)
        for start in range(lo, hi, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            mask = (e < hi)[:, None] & hmask[None, :]
            w = tl.load(w_ptr + e, mask=e < hi, other=0.0).to(ACC)
            logit = tl.load(logit_ptr + e[:, None] * H + offs_h[None, :], mask=mask, other=0.0).to(ACC)
            expo = tl.exp(tl.minimum(logit - top[None, :], MAX_EXPONENT))
            denom += tl.sum(tl.where(mask, w[:, None] * expo, 0.0), axis=0)
        denom += SOFTMAX_EPS
        for start in range(lo, hi, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            mask = (e < hi)[:, None] & hmask[None, :]
            w = tl.load(w_ptr + e, mask=e < hi, other=0.0).to(ACC)
            at = e[:, None] * H + offs_h[None, :]
            logit = tl.load(logit_ptr + at, mask=mask, other=0.0).to(ACC)
            expo = tl.exp(tl.minimum(logit - top[None, :], MAX_EXPONENT))
            tl.store(alpha_ptr + at, w[:, None] * expo / denom[None, :], mask=mask)
            tl.store(beta_ptr + at, expo / denom[None, :], mask=mask)

    @triton.jit
    def _edge_softmax_backward_kernel(rowptr_ptr, alpha_ptr, beta_ptr, g_ptr, grad_logit_ptr, grad_w_ptr, H,
                                      BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
        lo, hi, offs_h, hmask = _softmax_tile(rowptr_ptr, H, BLOCK_H)
        dot = tl.zeros([BLOCK_H], dtype=ACC)
        for start in range(lo, hi, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            mask = (e < hi)[:, None] & hmask[None, :]
            at = e[:, None] * H + offs_h[None, :]
            a = tl.load(alpha_ptr + at, mask=mask, other=0.0).to(ACC)
            dot += tl.sum(a * tl.load(g_ptr + at, mask=mask, other=0.0).to(ACC), axis=0)
        for start in range(lo, hi, BLOCK_E):
            e = start + tl.arange(0, BLOCK_E)
            mask = (e < hi)[:, None] & hmask[None, :]
            at = e[:, None] * H + offs_h[None, :]
            centred = tl.load(g_ptr + at, mask=mask, other=0.0).to(ACC) - dot[None, :]
            tl.store(grad_logit_ptr + at, tl.load(alpha_ptr + at, mask=mask, other=0.0).to(ACC) * centred, mask=mask)
            beta = tl.load(beta_ptr + at, mask=mask, other=0.0).to(ACC)
            tl.store(grad_w_ptr + e, tl.sum(tl.where(mask, beta * centred, 0.0), axis=1), mask=e < hi)


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
    _run(_forward_kernel, rowptr, col.numel(), f, dtype,
         (col.contiguous(), weight.contiguous(), x.contiguous(), out if bias is None else bias.contiguous(),
          out if residual is None else residual.contiguous(), out, saved, f, nbytes),
         HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=code)
    return out, saved


def aggregate_tangents(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """A @ x[p] for every tangent p: x [P, m, f] -> [P, n, f]; one aggregation of x as
    [m, P * f], so the CSR is read once for all tangents; see the reference."""
    P, m, f = x.shape
    out, _ = aggregate_forward(rowptr, col, weight, x.permute(1, 0, 2).reshape(m, P * f))
    return out.view(rowptr.numel() - 1, P, f).permute(1, 0, 2).contiguous()


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
    _run(_backward_kernel, t_rowptr, t_col.numel(), f, dtype,
         (t_col.contiguous(), t_weight.contiguous(), grad_out, _saved_arg(saved, act, grad_out), out, f, -(-f // 8)),
         ACT=code)
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
    _edge_grad_kernel[(triton.cdiv(num_edges, EDGE_BLOCK),)](
        rowptr.contiguous(), col.contiguous(), grad_out, _saved_arg(saved, act, grad_out), x.contiguous(), out,
        n, num_edges, f, -(-f // 8), max(n - 1, 0).bit_length(),
        ACT=code, BLOCK_E=EDGE_BLOCK, BLOCK_F=min(64, _block_f(f)), ACC=_acc_dtype(dtype))
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

    def arg(t):
        return out if t is None else t.contiguous()

    _run(_propagate_kernel, rowptr, col.numel(), f, dtype,
         (col.contiguous(), x.contiguous(), arg(row_scale), arg(self_x), arg(self_scale), arg(bias), out, f),
         HAS_SCALE=row_scale is not None, HAS_SELF=self_x is not None, HAS_SELF_SCALE=self_scale is not None,
         HAS_BIAS=bias is not None, SKIP_LOOPS=bool(skip_loops), ACT=code)
    return out


def _softmax_launch(kernel, rowptr: Tensor, heads: int, dtype: torch.dtype, *args) -> None:
    """Launch an edge-softmax kernel: one program per row, all heads in one block."""
    n = rowptr.numel() - 1
    if n > 0 and heads > 0:
        kernel[(n,)](rowptr.contiguous(), *args, heads, BLOCK_E=SOFTMAX_BLOCK_E,
                     BLOCK_H=triton.next_power_of_2(heads), ACC=_acc_dtype(dtype))


def edge_softmax(rowptr: Tensor, logits: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Edge-weighted softmax per CSR row and head; see :func:`.reference.edge_softmax`."""
    _check_available()
    dtype = _dtype(logits, weight)
    alpha = torch.zeros(logits.shape, dtype=dtype, device=logits.device)
    beta = torch.zeros_like(alpha)
    _softmax_launch(_edge_softmax_kernel, rowptr, logits.shape[1], dtype, logits.contiguous(), weight.contiguous(),
                    alpha, beta)
    return alpha, beta


def edge_softmax_backward(rowptr: Tensor, alpha: Tensor, beta: Tensor, grad_alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`edge_softmax`; see :func:`.reference.edge_softmax_backward`."""
    _check_available()
    dtype = _dtype(alpha, beta, grad_alpha)
    grad_logits = torch.zeros(alpha.shape, dtype=dtype, device=alpha.device)
    grad_weight = torch.zeros(alpha.shape[0], dtype=dtype, device=alpha.device)
    _softmax_launch(_edge_softmax_backward_kernel, rowptr, alpha.shape[1], dtype, alpha.contiguous(),
                    beta.contiguous(), grad_alpha.contiguous(), grad_logits, grad_weight)
    return grad_logits, grad_weight
