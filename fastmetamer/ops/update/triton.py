"""Triton fused update of binary straight-through features: top-rho selection and Adam.

Same contract as :mod:`.reference`.

``top_mask`` / ``top_mask_csr`` -- exact top-k per row block by radix select, without sorting:
  1. P = sigmoid(s theta) is never stored; every pass recomputes it (``tl.sigmoid``'s formula,
     inlined). P >= 0, so the IEEE bit pattern of P read as an integer (int32 for fp32, int64 for
     fp64) is an order-preserving key.
  2. Radix select from the most significant digit (``RADIX`` = 6 bits, 64 bins) finds, per block,
     the exact key of the r-th largest P for the two ranks r = k and r = k + 1 (clamped to
     [1, size]) at once: 6 passes for fp32 keys, 11 for fp64 (the last digit is the lowest
     ``RADIX`` bits, overlapping bits already known). Each pass launches one histogram kernel (a
     program per tile of ``BLOCK_R`` rows, looping over column chunks of ``BLOCK_D``): the digits
     of the keys whose higher bits match the block's prefix so far, counted per row by
     ``tl.histogram`` over row-offset digits and added with int64 atomics -- one per bin when the
     tile lies in one block, else one per row and bin (integer atomics: deterministic). Torch ops
     on the device then pick each block's digit (the bin where the count from the top reaches the
     remaining rank) and extend the prefix. No host synchronisation.
  3. threshold = (P_(k) + P_(k+1)) / 2 from the found keys (max P + 1e-6 when k = 0, min P - 1e-6
     when k = size), exactly as in the reference; rows outside every block get 0.
  4. Exact ties: a counting pass stores per row the number of keys > K and == K (K = key of
     P_(k)); segmented prefix sums over rows (torch cumsum, int64) give each row how many of the
     k - count(> K) tied entries its block still takes when the row starts, hence each row's
     number of ones. The selection kernel walks each row's columns with a running in-row prefix
     count (``tl.cumsum``) and takes key > K, plus key == K while the tie rank is below that
     quota: exactly k ones per block, ties in row-major order. ``top_mask`` writes the dense 0/1
     rows; ``top_mask_csr`` writes each one's column id at ``rowptr[row]`` + its rank in the row
     (``rowptr`` = cumsum of the rows' counts), so the CSR comes straight from the selection,
     columns increasing within a row, without the dense mask or ``nonzero``.
  Counts are int64 (a block may hold more than 2^31 elements). The number of ones,
  sum(clamp(k, 0, size)), sizes ``col``; it, the rows' blocks and the device copies of ``ptr`` and
  ``k`` are memoised per (ptr, k) tensor object and version, so a step loop passing the same
  unmodified ptr and k reads nothing back (the first call reads the count when k lives on the GPU).

``adam_ste_update`` -- one fused elementwise kernel (straight-through gradient, margin term,
Adam moments, bias correction, masked step, clamp of the logits to [-bound, bound]), in place.
"""
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..aggregate import triton as _agg
from .reference import check_bound, linear_input_grad, total_grad  # noqa: F401 (cuBLAS GEMMs)

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None

AVAILABLE = triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")

BLOCK_R = 32    # rows per program in the top-k passes
BLOCK_D = 64    # columns per chunk in the top-k passes
RADIX = 6       # bits per digit of the radix select
BLOCK_N = 1024  # elements per program in the Adam kernel
NUM_WARPS = 8   # warps per program of the top-k kernels

if triton is not None:

    @triton.jit
    def _keys(base, cols, mask, slope, KEY: tl.constexpr):
        """The int64 key (bit pattern) of P = sigmoid(slope * theta) at ``base + cols`` (row base
        pointers [BLOCK_R, 1], columns [1, BLOCK_D])."""
        th = tl.load(base + cols, mask=mask, other=0.0)
        p = 1 / (1 + tl.exp(-(th * slope)))
        return p.to(KEY, bitcast=True).to(tl.int64)

    @triton.jit
    def _tile_rows(theta_ptr, blk_ptr, num_rows, d, BLOCK_R: tl.constexpr):
        """This program's rows, their blocks (0 where none), whether they have one and their base
        pointers into theta."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        blk = tl.load(blk_ptr + rows, mask=rows < num_rows, other=-1)
        valid = blk >= 0
        return rows, tl.where(valid, blk, 0), valid, theta_ptr + rows[:, None] * d

    @triton.jit
    def _radix_count_kernel(theta_ptr, blk_ptr, prefix_ptr, hist_ptr, num_rows, d, slope, shift, high,
                            KEY: tl.constexpr, BINS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """hist[b, j, i] += #{keys of block b with (key & high) == prefix[b, j] and digit
        (key >> shift) % BINS == i}, j = 0, 1 (the two ranks): per row by ``tl.histogram`` over
        the row-offset digits, then int64 atomics."""
        rows, b, valid, base = _tile_rows(theta_ptr, blk_ptr, num_rows, d, BLOCK_R)
        p0 = tl.load(prefix_ptr + 2 * b, mask=valid, other=0)[:, None]
        p1 = tl.load(prefix_ptr + 2 * b + 1, mask=valid, other=0)[:, None]
        row_bin = (tl.arange(0, BLOCK_R) * BINS)[:, None]
        h0 = tl.zeros([BLOCK_R * BINS], dtype=tl.int64)
        h1 = tl.zeros([BLOCK_R * BINS], dtype=tl.int64)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)[None, :]
            mask = valid[:, None] & (cols < d)
            key = _keys(base, cols, mask, slope, KEY)
            top = key & high
            digit = tl.reshape(row_bin + ((key >> shift) & (BINS - 1)).to(tl.int32), [BLOCK_R * BLOCK_D])
            h0 += tl.histogram(digit, BLOCK_R * BINS, mask=tl.reshape(mask & (top == p0), [BLOCK_R * BLOCK_D]))
            h1 += tl.histogram(digit, BLOCK_R * BINS, mask=tl.reshape(mask & (top == p1), [BLOCK_R * BLOCK_D]))
        h0 = tl.reshape(h0, [BLOCK_R, BINS])
        h1 = tl.reshape(h1, [BLOCK_R, BINS])
        bins = tl.arange(0, BINS)
        blk = tl.where(valid, b, -1)
        first = tl.min(blk, axis=0)
        if (first >= 0) & (first == tl.max(blk, axis=0)):  # the tile lies in one block: one add per bin
            tl.atomic_add(hist_ptr + first * (2 * BINS) + bins, tl.sum(h0, axis=0))
            tl.atomic_add(hist_ptr + first * (2 * BINS) + BINS + bins, tl.sum(h1, axis=0))
        else:
            at = hist_ptr + (b * (2 * BINS))[:, None] + bins[None, :]
            tl.atomic_add(at, h0, mask=valid[:, None])
            tl.atomic_add(at + BINS, h1, mask=valid[:, None])

    @triton.jit
    def _row_ties_kernel(theta_ptr, blk_ptr, ksel_ptr, gt_ptr, eq_ptr, num_rows, d, slope,
                         KEY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Per row: #{key > K[block]} and #{key == K[block]} (int64)."""
        rows, b, valid, base = _tile_rows(theta_ptr, blk_ptr, num_rows, d, BLOCK_R)
        ksel = tl.load(ksel_ptr + b, mask=valid, other=0)[:, None]
        ngt = tl.zeros([BLOCK_R], dtype=tl.int64)
        neq = tl.zeros([BLOCK_R], dtype=tl.int64)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)[None, :]
            mask = valid[:, None] & (cols < d)
            key = _keys(base, cols, mask, slope, KEY)
            ngt += tl.sum((mask & (key > ksel)).to(tl.int32), axis=1)
            neq += tl.sum((mask & (key == ksel)).to(tl.int32), axis=1)
        rmask = rows < num_rows
        tl.store(gt_ptr + rows, ngt, mask=rmask)
        tl.store(eq_ptr + rows, neq, mask=rmask)

    @triton.jit
    def _select_kernel(theta_ptr, blk_ptr, ksel_ptr, quota_ptr, out_ptr, rowptr_ptr, nnz, num_rows, d, slope,
                       CSR: tl.constexpr, KEY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """The ones: key > K, or key == K with in-block tie rank < quota (row-major order). Dense
        (``CSR`` False): the 0/1 rows of out [F, d]; CSR: each one's column id at
        out[rowptr[row] + its rank in the row] (positions >= nnz dropped)."""
        rows, b, valid, base = _tile_rows(theta_ptr, blk_ptr, num_rows, d, BLOCK_R)
        ksel = tl.load(ksel_ptr + b, mask=valid, other=0)[:, None]
        quota = tl.load(quota_ptr + rows, mask=valid, other=0)[:, None]  # ties this row may still take
        taken = tl.zeros([BLOCK_R, 1], dtype=tl.int64)
        pos = tl.zeros([BLOCK_R, 1], dtype=tl.int64)
        if CSR:
            pos = tl.load(rowptr_ptr + rows, mask=valid, other=0)[:, None]
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)[None, :]
            mask = valid[:, None] & (cols < d)
            key = _keys(base, cols, mask, slope, KEY)
            eq = (mask & (key == ksel)).to(tl.int64)
            rank = taken + tl.cumsum(eq, axis=1) - eq
            sel = mask & ((key > ksel) | ((eq != 0) & (rank < quota)))
            if CSR:
                one = sel.to(tl.int64)
                at = pos + tl.cumsum(one, axis=1) - one
                tl.store(out_ptr + at, tl.broadcast_to(cols.to(tl.int64), (BLOCK_R, BLOCK_D)), mask=sel & (at < nnz))
                pos += tl.sum(one, axis=1, keep_dims=True)
            else:
                tl.store(out_ptr + rows[:, None] * d + cols, sel.to(tl.float32),
                         mask=(rows < num_rows)[:, None] & (cols < d))
            taken += tl.sum(eq, axis=1, keep_dims=True)

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
    """(triton key type, torch key type, torch float type, key of 1.0, key bits) of a logit dtype."""
    if dtype == torch.float64:
        return tl.int64, torch.int64, torch.float64, 0x3FF0000000000000, 64
    if dtype == torch.float32:
        return tl.int32, torch.int32, torch.float32, 0x3F800000, 32
    raise TypeError(f"triton top_mask supports float32 and float64 logits, not {dtype}")


def _blocks(ptr: Tensor, k: Tensor, num_rows: int, d: int, device: torch.device):
    """(ptr [C + 1] and k [C] on the device, blk [F] the block of each row (-1: none), the number of
    ones sum(clamp(k, 0, size)) as an int), memoised per (ptr, k) objects and versions."""
    def build():
        ptr_d, k_d = ptr.to(device=device, dtype=torch.long), k.to(device=device, dtype=torch.long)
        blk = torch.searchsorted(ptr_d, torch.arange(num_rows, device=device), right=True) - 1
        blk = torch.where(blk < ptr_d.numel() - 1, blk, -1)
        ones = k.long().clamp(min=0).minimum(ptr.to(k.device).long().diff() * d)  # on k's device
        return ptr_d, k_d, blk, int(ones.sum())

    return _agg._MEMO.get([ptr, k], ("blocks", num_rows, d, device), build)


def _select(theta: Tensor, ptr: Tensor, k: Tensor, slope: float):
    """Steps 2-4 of the module docstring up to the selection kernel: (blk [F], ksel [C] the key K
    of each block, quota [F], rowptr [F + 1] of the ones, nnz, threshold [F], key type)."""
    key_tl, key_torch, float_torch, key_one, bits = _key_types(theta.dtype)
    num_rows, d = theta.shape
    device = theta.device
    ptr, k, blk, nnz = _blocks(ptr, k, num_rows, d, device)
    size = ptr.diff() * d
    rem = torch.stack([k.clamp(max=size), (k + 1).clamp(max=size)], 1).clamp(min=1)  # ranks [C, 2]

    # 2. radix select of the two ranks' keys, most significant digit first.
    prefix = torch.zeros_like(rem)
    hist = torch.empty(rem.shape[0], 2, 1 << RADIX, dtype=torch.long, device=device)
    grid = (triton.cdiv(num_rows, BLOCK_R),)
    fixed = bits  # the bits >= fixed are known (the prefix)
    for shift in [*range(bits - RADIX, 0, -RADIX), 0]:  # the last digit overlaps known bits: harmless
        hist.zero_()
        high = -(1 << fixed) if fixed < 64 else 0
        _radix_count_kernel[grid](theta, blk, prefix, hist, num_rows, d, slope, shift, high, KEY=key_tl,
                                  BINS=1 << RADIX, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
        at_least = hist.flip(-1).cumsum(-1).flip(-1)  # [C, 2, bins]: keys with digit >= bin
        digit = ((at_least >= rem.unsqueeze(-1)).sum(-1) - 1).clamp_(min=0)
        rem -= F.pad(at_least, (0, 1)).gather(-1, (digit + 1).unsqueeze(-1)).squeeze(-1)
        prefix |= digit << shift
        fixed = shift
    values = prefix.to(key_torch).view(float_torch)  # P_(rank) for both ranks, [C, 2]

    # 3. thresholds, as the reference defines them.
    t = 0.5 * (values[:, 0] + values[:, 1])
    t = torch.where(k <= 0, values[:, 1] + 1e-6, t)
    t = torch.where(k >= size, values[:, 0] - 1e-6, t)
    b = blk.clamp(min=0)
    threshold = torch.where(blk >= 0, t[b], 0).to(theta.dtype)

    # 4. per-row ties quota and ones.
    middle = (k > 0) & (k < size)
    ksel = torch.where(middle, prefix[:, 0], torch.where(k <= 0, key_one + 1, -1))
    row_gt = torch.empty(num_rows, dtype=torch.long, device=device)
    row_eq = torch.empty_like(row_gt)
    _row_ties_kernel[grid](theta, blk, ksel, row_gt, row_eq, num_rows, d, slope,
                           KEY=key_tl, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    cum_gt, cum_eq = F.pad(row_gt.cumsum(0), (1, 0)), F.pad(row_eq.cumsum(0), (1, 0))
    ptr_c = ptr.clamp(0, num_rows)
    need = torch.where(middle, k - (cum_gt[ptr_c[1:]] - cum_gt[ptr_c[:-1]]), 0)  # ties each block takes
    quota = need[b] - (cum_eq[:-1] - cum_eq[ptr_c[b]])
    ones = torch.where(blk >= 0, row_gt + quota.clamp(min=0).minimum(row_eq), 0)
    return blk, ksel, quota, F.pad(ones.cumsum(0), (1, 0)), nnz, threshold, key_tl


def _trivial(theta: Tensor, ptr: Tensor) -> bool:
    """No entry to select from: no rows, no columns or no blocks."""
    return theta.shape[0] == 0 or theta.shape[1] == 0 or ptr.numel() <= 1


def top_mask(theta: Tensor, ptr: Tensor, k: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """Hard top-k mask per row block and the block thresholds; see the reference."""
    _agg._check_available()
    _key_types(theta.dtype)
    theta = theta.contiguous()
    if _trivial(theta, ptr):
        return torch.zeros_like(theta), theta.new_zeros(theta.shape[0])
    blk, ksel, quota, _, _, threshold, key_tl = _select(theta, ptr, k, slope)
    hard = torch.empty_like(theta)
    _select_kernel[(triton.cdiv(theta.shape[0], BLOCK_R),)](
        theta, blk, ksel, quota, hard, quota, 0, *theta.shape, slope,
        CSR=False, KEY=key_tl, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return hard, threshold


def top_mask_csr(theta: Tensor, ptr: Tensor, k: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """The ones of :func:`top_mask`'s mask as CSR (rowptr, col) and the thresholds, written by
    the selection kernel itself (no dense mask); see the reference."""
    _agg._check_available()
    _key_types(theta.dtype)
    theta = theta.contiguous()
    num_rows, device = theta.shape[0], theta.device
    if _trivial(theta, ptr):
        return (torch.zeros(num_rows + 1, dtype=torch.long, device=device),
                torch.empty(0, dtype=torch.long, device=device), theta.new_zeros(num_rows))
    blk, ksel, quota, rowptr, nnz, threshold, key_tl = _select(theta, ptr, k, slope)
    col = torch.empty(nnz, dtype=torch.long, device=device)
    _select_kernel[(triton.cdiv(num_rows, BLOCK_R),)](
        theta, blk, ksel, quota, col, rowptr, nnz, *theta.shape, slope,
        CSR=True, KEY=key_tl, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return rowptr, col, threshold


def adam_ste_update(theta: Tensor, grad_x: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                    step: int, lr: float, beta1: float, beta2: float, eps: float, slope: float,
                    threshold: Tensor, margin: float, margin_scale: Tensor, active: Tensor,
                    bound: float | None = None, grad_product: tuple[Tensor, Tensor] | None = None) -> None:
    """One fused straight-through + margin + Adam step and the clamp of theta to [-bound, bound]
    (None: no clamp), in place, in one kernel; see the reference (``grad_product`` is formed by
    a cuBLAS GEMM first)."""
    _agg._check_available()
    bound = check_bound(bound)
    grad_x = total_grad(grad_x, grad_product, theta)
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
