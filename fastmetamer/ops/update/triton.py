"""Triton fused update of binary straight-through features: top-rho selection and Adam.

Same contract as :mod:`.reference`.

``top_mask`` -- exact top-k per row block without sorting (bisection on the bit pattern):
  1. P = sigmoid(s theta) is never stored; every pass recomputes it. P >= 0, so the IEEE bit
     pattern of P read as an integer (int32 for fp32, int64 for fp64) is an order-preserving key.
  2. Bisection on the integer key space finds, per block, the exact key of the r-th largest P
     for the two ranks r = k and r = k + 1 (clamped to [1, size]) at once: keep ``lo`` with
     count(key >= lo) >= r and ``hi`` with count(key >= hi) < r; each of the ceil(log2(key(1)+1))
     passes (30 for fp32, 62 for fp64) launches one counting kernel (one program per tile of
     rows, a loop over columns, one integer atomic add per row into its block's counter --
     integer atomics, so the result is deterministic) and halves [lo, hi] in torch on the device.
  3. threshold = (P_(k) + P_(k+1)) / 2 from the found keys (max P + 1e-6 when k = 0, min P - 1e-6
     when k = size), exactly as in the reference.
  4. Exact ties: a counting pass stores per row the number of keys > K and == K (K = key of
     P_(k)); segmented prefix sums over rows (torch cumsum, integers) give each row how many of the
     k - count(> K) tied entries it may still take. The mask kernel walks each row's columns with
     a running in-row prefix count (``tl.cumsum``) and selects key > K, plus key == K while the
     tie rank is below that quota: exactly k ones per block, ties taken in row-major order.

``adam_ste_update`` -- one fused elementwise kernel (straight-through gradient, margin term,
Adam moments, bias correction, masked step, clamp of the logits to [-bound, bound]), in place.
"""
import os

import torch
from torch import Tensor

from ..aggregate import triton as _agg
from .reference import check_bound, mask_to_csr

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None

AVAILABLE = triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")

BLOCK_R = 16   # rows per program in the top-k passes
BLOCK_D = 64   # columns per chunk in the top-k passes
BLOCK_N = 1024  # elements per program in the Adam kernel

if triton is not None:

    @triton.jit
    def _prob_key(theta_ptr, rows, cols, mask, d, slope, KEY: tl.constexpr):
        th = tl.load(theta_ptr + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)
        p = tl.sigmoid(th * slope)
        return p.to(KEY, bitcast=True).to(tl.int64)

    @triton.jit
    def _count_ge_kernel(theta_ptr, blk_ptr, cand_ptr, cnt_ptr, num_rows, d, slope,
                         KEY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """cnt[2b + j] += #{elements of block b with key >= cand[2b + j]}, j = 0, 1."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        blk = tl.load(blk_ptr + rows, mask=rows < num_rows, other=-1)
        valid = blk >= 0
        blk = tl.where(valid, blk, 0)
        c0 = tl.load(cand_ptr + 2 * blk, mask=valid, other=0)
        c1 = tl.load(cand_ptr + 2 * blk + 1, mask=valid, other=0)
        n0 = tl.zeros([BLOCK_R], dtype=tl.int32)
        n1 = tl.zeros([BLOCK_R], dtype=tl.int32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = valid[:, None] & (cols < d)[None, :]
            key = _prob_key(theta_ptr, rows, cols, mask, d, slope, KEY)
            n0 += tl.sum((mask & (key >= c0[:, None])).to(tl.int32), axis=1)
            n1 += tl.sum((mask & (key >= c1[:, None])).to(tl.int32), axis=1)
        tl.atomic_add(cnt_ptr + 2 * blk, n0, mask=valid)
        tl.atomic_add(cnt_ptr + 2 * blk + 1, n1, mask=valid)

    @triton.jit
    def _row_ties_kernel(theta_ptr, blk_ptr, ksel_ptr, gt_ptr, eq_ptr, num_rows, d, slope,
                         KEY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Per row: #{key > K[block]} and #{key == K[block]}."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < num_rows
        blk = tl.load(blk_ptr + rows, mask=rmask, other=-1)
        valid = blk >= 0
        ksel = tl.load(ksel_ptr + tl.where(valid, blk, 0), mask=valid, other=0)
        ngt = tl.zeros([BLOCK_R], dtype=tl.int32)
        neq = tl.zeros([BLOCK_R], dtype=tl.int32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = valid[:, None] & (cols < d)[None, :]
            key = _prob_key(theta_ptr, rows, cols, mask, d, slope, KEY)
            ngt += tl.sum((mask & (key > ksel[:, None])).to(tl.int32), axis=1)
            neq += tl.sum((mask & (key == ksel[:, None])).to(tl.int32), axis=1)
        tl.store(gt_ptr + rows, ngt, mask=rmask)
        tl.store(eq_ptr + rows, neq, mask=rmask)

    @triton.jit
    def _mask_kernel(theta_ptr, blk_ptr, ksel_ptr, quota_ptr, hard_ptr, num_rows, d, slope,
                     KEY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """hard = key > K, or key == K with in-block tie rank < quota (row-major order)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < num_rows
        blk = tl.load(blk_ptr + rows, mask=rmask, other=-1)
        valid = blk >= 0
        ksel = tl.load(ksel_ptr + tl.where(valid, blk, 0), mask=valid, other=0)
        quota = tl.load(quota_ptr + rows, mask=valid, other=0)  # ties this row may still take
        taken = tl.zeros([BLOCK_R], dtype=tl.int64)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = valid[:, None] & (cols < d)[None, :]
            key = _prob_key(theta_ptr, rows, cols, mask, d, slope, KEY)
            eq = (mask & (key == ksel[:, None])).to(tl.int64)
            rank = taken[:, None] + tl.cumsum(eq, axis=1) - eq
            sel = mask & ((key > ksel[:, None]) | ((eq != 0) & (rank < quota[:, None])))
            tl.store(hard_ptr + rows[:, None] * d + cols[None, :], sel.to(tl.float32),
                     mask=rmask[:, None] & (cols < d)[None, :])
            taken += tl.sum(eq, axis=1)

    @triton.jit
    def _adam_ste_kernel(theta_ptr, gx_ptr, m_ptr, v_ptr, thr_ptr, ms_ptr, active_ptr, numel, d,
                         lr, beta1, beta2, eps, slope, margin, bc1, bc2, bound,
                         CLAMP: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        row = offs // d
        th = tl.load(theta_ptr + offs, mask=mask, other=0.0)
        gx = tl.load(gx_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        thr = tl.load(thr_ptr + row, mask=mask, other=0.0)
        ms = tl.load(ms_ptr + row, mask=mask, other=0.0)
        active = tl.load(active_ptr + row, mask=mask, other=0)
        p = tl.sigmoid(slope * th)
        gap = p - thr
        sign = tl.where(gap > 0, 1.0, tl.where(gap < 0, -1.0, 0.0))
        grad_p = gx - tl.where(tl.abs(gap) < margin, ms * sign, 0.0)
        g = grad_p * slope * p * (1.0 - p)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        if FP64:
            root = tl.sqrt(v / bc2)  # f64 sqrt is IEEE-rounded
        else:
            root = tl.sqrt_rn(v / bc2)  # tl.sqrt is the approximate one for fp32
        update = (m / bc1) / (root + eps)
        th = tl.where(active != 0, th - lr * update, th)
        if CLAMP:  # every row, active or not; NaN stays NaN (comparisons with NaN are false)
            th = tl.where(th < -bound, -bound, tl.where(th > bound, bound, th))
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(theta_ptr + offs, th, mask=mask)


def _limit(bound: float, dtype: torch.dtype) -> float:
    """The clamp limit as the reference rounds it (to theta's dtype); a scalar kernel argument
    is passed as fp32, so for fp32 logits this is exactly the reference's limit."""
    return float(torch.tensor(bound, dtype=dtype)) if bound != float("inf") else 0.0


def _key_types(dtype: torch.dtype):
    if dtype == torch.float64:
        return tl.int64, torch.int64, torch.float64, 0x3FF0000000000000
    if dtype == torch.float32:
        return tl.int32, torch.int32, torch.float32, 0x3F800000
    raise TypeError(f"triton top_mask supports float32 and float64 logits, not {dtype}")


def top_mask(theta: Tensor, ptr: Tensor, k: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """Hard top-k mask per row block and the block thresholds; see the reference."""
    _agg._check_available()
    key_tl, key_torch, float_torch, key_one = _key_types(theta.dtype)
    device = theta.device
    theta = theta.contiguous()
    num_rows, d = theta.shape
    hard = torch.zeros_like(theta)
    threshold = theta.new_empty(num_rows)
    num_blocks = ptr.numel() - 1
    if num_rows == 0 or num_blocks <= 0 or d == 0:
        return hard, threshold
    ptr = ptr.to(device=device, dtype=torch.long)
    k = k.to(device=device, dtype=torch.long)
    row_ids = torch.arange(num_rows, device=device)
    blk = torch.searchsorted(ptr, row_ids, right=True) - 1
    blk = torch.where((blk >= 0) & (blk < num_blocks) & (row_ids >= ptr[0]), blk, -1).contiguous()
    size = ptr.diff() * d
    ranks = torch.stack([k.clamp(max=size), (k + 1).clamp(max=size)], 1).clamp(min=1)  # [C, 2]

    # 2. bisection on the key: count(key >= lo) >= rank > count(key >= hi).
    lo = torch.zeros(num_blocks, 2, dtype=torch.long, device=device)
    hi = torch.full_like(lo, key_one + 1)
    cnt = torch.empty(num_blocks, 2, dtype=torch.int32, device=device)
    grid = (triton.cdiv(num_rows, BLOCK_R),)
    for _ in range(key_one.bit_length()):
        mid = lo + (hi - lo) // 2
        cnt.zero_()
        _count_ge_kernel[grid](theta, blk, mid, cnt, num_rows, d, slope,
                               KEY=key_tl, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
        enough = cnt >= ranks
        lo = torch.where(enough, mid, lo)
        hi = torch.where(enough, hi, mid)
    values = lo.to(key_torch).view(float_torch)  # P_(rank) for both ranks, [C, 2]

    # 3. thresholds, as the reference defines them.
    t = 0.5 * (values[:, 0] + values[:, 1])
    t = torch.where(k <= 0, values[:, 1] + 1e-6, t)
    t = torch.where(k >= size, values[:, 0] - 1e-6, t)
    threshold.copy_(t[blk.clamp(min=0)])

    # 4. exact-k mask with ties taken in row-major order.
    middle = (k > 0) & (k < size)
    ksel = torch.where(middle, lo[:, 0], torch.where(k <= 0, key_one + 1, -1)).contiguous()
    row_gt = torch.empty(num_rows, dtype=torch.int32, device=device)
    row_eq = torch.empty(num_rows, dtype=torch.int32, device=device)
    _row_ties_kernel[grid](theta, blk, ksel, row_gt, row_eq, num_rows, d, slope,
                           KEY=key_tl, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    cum_gt = torch.cat([zero, row_gt.long().cumsum(0)])
    cum_eq = torch.cat([zero, row_eq.long().cumsum(0)])
    ptr_c = ptr.clamp(0, num_rows)
    block_gt = cum_gt[ptr_c[1:]] - cum_gt[ptr_c[:-1]]
    need = torch.where(middle, k - block_gt, 0)  # ties each block takes
    b = blk.clamp(min=0)
    quota = (need[b] - (cum_eq[:-1] - cum_eq[ptr_c[b]])).contiguous()
    _mask_kernel[grid](theta, blk, ksel, quota, hard, num_rows, d, slope,
                       KEY=key_tl, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return hard, threshold


def top_mask_csr(theta: Tensor, ptr: Tensor, k: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """The ones of :func:`top_mask`'s mask as CSR (rowptr, col) and the thresholds; see the
    reference. The selection runs in the Triton kernels, the compaction in ``torch.nonzero``."""
    hard, threshold = top_mask(theta, ptr, k, slope)
    return mask_to_csr(hard) + (threshold,)


def adam_ste_update(theta: Tensor, grad_x: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                    step: int, lr: float, beta1: float, beta2: float, eps: float, slope: float,
                    threshold: Tensor, margin: float, margin_scale: Tensor, active: Tensor,
                    bound: float | None = None) -> None:
    """One fused straight-through + margin + Adam step and the clamp of theta to [-bound, bound]
    (None: no clamp), in place, in one kernel; see the reference."""
    _agg._check_available()
    bound = check_bound(bound)
    numel = theta.numel()
    if numel == 0:
        return
    d = theta.shape[1]
    bufs = [t if t.is_contiguous() else t.contiguous() for t in (theta, exp_avg, exp_avg_sq)]
    active = active.contiguous()
    active = active.view(torch.uint8) if active.dtype == torch.bool else (active != 0).view(torch.uint8)
    _adam_ste_kernel[(triton.cdiv(numel, BLOCK_N),)](
        bufs[0], grad_x.contiguous(), bufs[1], bufs[2], threshold.contiguous(),
        margin_scale.contiguous(), active, numel, d,
        float(lr), float(beta1), float(beta2), float(eps), float(slope), float(margin),
        float(1 - beta1 ** step), float(1 - beta2 ** step), _limit(bound, theta.dtype),
        CLAMP=bound != float("inf"), FP64=theta.dtype == torch.float64, BLOCK=BLOCK_N)
    for buf, orig in zip(bufs, (theta, exp_avg, exp_avg_sq)):
        if buf is not orig:
            orig.copy_(buf)
