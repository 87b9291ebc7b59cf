"""CUDA C++ fused update of binary straight-through features (``csrc/cuda/update.cu``).

Same functions and signatures as :mod:`fastmetamer.ops.update.cpu`; contract:
:mod:`fastmetamer.ops.update.reference`. theta and the Adam tensors live on one CUDA device;
``ptr`` and ``k`` on that device or on the CPU. float32 / int64 / bool contiguous tensors; bad
inputs raise ValueError. Outputs and scratch are allocated with torch on theta's device and every
kernel runs on its current stream.

``top_mask`` / ``top_mask_csr`` -- exact top-k per row block by radix select on the key of
P = sigmoid(s theta) (its float32 bit pattern as uint32: P >= 0, so it orders like P; every NaN
ranks above every P). P is never stored: each pass over theta recomputes it. Per block of n
elements, K = key of the r-th largest P (r = clamp(k, 1, n)), gt / eq = how many keys are > / ==
K; the ones are every key > K and the first ``clamp(k, 0, n) - gt`` keys == K in row-major order
(the reference's tie order, exactly clamp(k, 0, n) ones). Two block classes:

* small blocks (1 .. 1024 elements: e.g. per-row mode, d <= 1024), ``small_blocks_kernel``: one
  warp per block (256-thread CTAs, 8 blocks each, grid-stride over all blocks; large and empty
  ones are skipped). The warp holds the block's keys in registers (lane l: elements l, l + 32,
  ...) and finds K by bisection on the key bits below the common prefix of the block's min and
  max key (<= 30 warp counts), then gt, eq and the largest key below K (for P_(k+1)) by warp
  reductions, and emits the mask in memory order, 32 elements a step, a warp ballot ranking the
  ties. One read of theta, no shared memory.
* large blocks (more than 1024 elements, e.g. one block of the whole matrix): cut into tiles of
  8192 elements (one 256-thread CTA each; a tile lies in one block), each of 8 subtiles of 1024
  (one warp). ``fm_top_mask_select`` runs 4 radix passes over the 30-bit key (digits of 8, 8, 8
  and 6 bits): ``histogram_kernel`` counts the digit of the keys that match the digits found so
  far (shared-memory histogram per tile, one int64 global atomic per non-empty bin into the
  block's [256] histogram), ``select_kernel`` (a warp per block) picks the bin where the count
  from the top reaches the remaining rank; after the 4 passes K, gt and eq are known.
  ``count_kernel`` then stores per subtile #{key > K} and #{key == K} and the block's largest key
  below K (integer atomicMax). Segmented exclusive cumsums over the subtiles (torch, on the
  device) give each subtile the ties of its block before it and, for the CSR form, its ones before
  it; ``large_emit_kernel`` (a warp per subtile) then emits like the small-block warps. Each large
  block costs 6 reads of theta (5 for the selection, 1 for the emission) whatever its size, plus
  [L, 256] histogram and [L, 5] state int64 scratch; where most P share one binade, the first
  pass's shared-memory atomics collide within a warp (P in [0.5, 1) spans 2 bins of that digit).

Both emit the dense mask and the thresholds (``fm_top_mask``), or the CSR of the ones directly
(``fm_top_mask_csr``): block c's ones go to ``col`` from ``start[c]`` = the ones of the blocks
before it (a cumsum of clamp(k, 0, size)), in memory order, so each row's columns increase; the
rows' counts (integer atomics) give ``rowptr`` by a cumsum. Only integer atomics (counts, max):
the outputs are bitwise deterministic. Rows outside every block get mask 0 and threshold 0.

Reads to the host: the blocks are split into the two classes and the large ones into tiles on the
host from ``ptr`` (a copy to the host when ptr lives on the GPU, a synchronisation; then O(C)
host work and a copy of the tile lists to the device); ``top_mask_csr`` needs the number of ones
sum(clamp(k, 0, size)) to allocate ``col`` (a read of k's sum when k lives on the GPU). These,
and the device copies of a CPU ptr or k, are memoised per (ptr, k) tensor object and version
counter, so a step loop that passes the same, unmodified ptr and k pays them once (modify ptr and
k only by torch's in-place ops, which bump the version counter). Nothing else is read back.
k < 0 selects nothing, as in the reference.

``adam_ste_update`` -- one fused elementwise kernel (256-thread CTAs, at most 4096 of them,
grid-stride over the elements), in place, float32 math as the reference; the bias corrections
1 - beta^step are computed on the host in double.
"""
from __future__ import annotations

from functools import cached_property, partial

import torch
from torch import Tensor

from .. import cuda_library
from ..checks import check_tensor
from ..memo import Memo
from .reference import check_bound, linear_input_grad, total_grad  # noqa: F401 (cuBLAS GEMMs)

AVAILABLE = cuda_library.available()

# Layout constants of csrc/cuda/update.cu (the kernels check SMALL_MAX and TILE against theirs).
SMALL_MAX = 1024  # elements of the largest block selected by one warp
TILE = 8192       # elements per CTA in the large-block passes
TILE_WARPS = 8    # warps (subtiles of 1024 elements) per tile
BINS = 256        # radix bins per large block
STATE_COLS, STATE_GT = 5, 2  # the int64 selection state [L, 5] of each large block; column of gt


def top_mask(theta: Tensor, ptr: Tensor, k: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """(hard [F, d] float 0/1, threshold [F]) as :func:`fastmetamer.ops.update.reference.top_mask`.

    ptr [C + 1] non-decreasing row offsets within [0, F]; k [C] (k <= 0: no ones, k >= size: all);
    rows outside every block get mask 0 and threshold 0.
    """
    device = _check_blocks(theta, ptr, k)
    num_rows, d = theta.shape
    blocks = _blocks(ptr, num_rows, d, device)
    hard = torch.empty_like(theta)
    hard[:blocks.first_row] = 0
    hard[blocks.end_row:] = 0
    threshold = torch.zeros(num_rows, dtype=theta.dtype, device=device)
    if theta.numel():
        k_dev = _on_device(k, device)
        state, ties, _ = _select_large(theta, blocks, k_dev, slope, csr=False)
        cuda_library.call("top_mask", theta, blocks.ptr, k_dev, blocks.num_blocks, d, float(slope),
                          blocks.num_large, blocks.large, blocks.num_tiles, blocks.tile_large,
                          blocks.tile_offset, state, ties, hard, threshold, SMALL_MAX, TILE)
    return hard, threshold


def top_mask_csr(theta: Tensor, ptr: Tensor, k: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(rowptr [F + 1], col [nnz], threshold [F]) as :func:`fastmetamer.ops.update.reference.top_mask_csr`:
    the kernels write the columns of the ones directly (no dense mask)."""
    device = _check_blocks(theta, ptr, k)
    num_rows, d = theta.shape
    blocks = _blocks(ptr, num_rows, d, device)
    start, nnz = _ones(blocks, ptr, k, num_rows, d, device)
    col = torch.empty(nnz, dtype=torch.long, device=device)
    row_count = torch.zeros(num_rows, dtype=torch.long, device=device)
    threshold = torch.zeros(num_rows, dtype=theta.dtype, device=device)
    if theta.numel():
        k_dev = _on_device(k, device)
        state, ties, ones = _select_large(theta, blocks, k_dev, slope, csr=True)
        cuda_library.call("top_mask_csr", theta, blocks.ptr, k_dev, blocks.num_blocks, d, float(slope),
                          blocks.num_large, blocks.large, blocks.num_tiles, blocks.tile_large,
                          blocks.tile_offset, state, ties, ones, start, col, row_count, threshold,
                          SMALL_MAX, TILE)
    rowptr = torch.zeros(num_rows + 1, dtype=torch.long, device=device)
    rowptr[1:] = row_count.cumsum(0)
    return rowptr, col, threshold


def adam_ste_update(theta: Tensor, grad_x: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                    step: int, lr: float, beta1: float, beta2: float, eps: float, slope: float,
                    threshold: Tensor, margin: float, margin_scale: Tensor, active: Tensor,
                    bound: float | None = None, grad_product: tuple[Tensor, Tensor] | None = None) -> None:
    """One fused straight-through + margin + Adam step and the clamp of theta to [-bound, bound]
    (None: no clamp), in place, in one kernel (see the reference; ``grad_product`` is formed by a
    cuBLAS GEMM first). All tensors on theta's device."""
    device, shape = _check(theta, "theta", torch.float32, 2), tuple(theta.shape)
    grad_x = total_grad(grad_x, grad_product, theta)
    _check(grad_x, "grad_x", torch.float32, 2, shape, device)
    _check(exp_avg, "exp_avg", torch.float32, 2, shape, device)
    _check(exp_avg_sq, "exp_avg_sq", torch.float32, 2, shape, device)
    _check(threshold, "threshold", torch.float32, 1, shape[:1], device)
    _check(margin_scale, "margin_scale", torch.float32, 1, shape[:1], device)
    _check(active, "active", torch.bool, 1, shape[:1], device)
    step = int(step)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    bound = check_bound(bound)
    if theta.numel() == 0:
        return
    cuda_library.call("adam_ste_update", theta, grad_x, exp_avg, exp_avg_sq, shape[0], shape[1], float(lr),
                      float(beta1), float(beta2), float(eps), float(slope), threshold, float(margin),
                      margin_scale, active, 1.0 - float(beta1) ** step, 1.0 - float(beta2) ** step, bound)


# ------------------------------------------------------------------------------ checks
_check = partial(check_tensor, backend="cuda")


def _check_blocks(theta: Tensor, ptr: Tensor, k: Tensor) -> torch.device:
    """theta [F, d] float32 on a CUDA device, ptr [C + 1] (C >= 0) and k [C] int64 on that device
    or the CPU; returns theta's device. ptr's values are checked when its blocks are split."""
    device = _check(theta, "theta", torch.float32, 2)
    _check(ptr, "ptr", torch.int64, 1, None, device, host_ok=True)
    if ptr.numel() < 1:
        raise ValueError("ptr must have C + 1 >= 1 entries")
    _check(k, "k", torch.int64, 1, (ptr.numel() - 1,), device, host_ok=True)
    return device


# ------------------------------------------------------------------------------ host-side plans
_MEMO = Memo()


class _Blocks:
    """The row blocks of ``ptr`` for ``d`` columns as the kernels take them: ptr on the device,
    the large blocks (more than SMALL_MAX elements) and their tiles and subtiles."""

    def __init__(self, ptr: Tensor, num_rows: int, d: int, device: torch.device):
        host = ptr.cpu()  # a device -> host copy (and synchronisation) when ptr lives on the GPU
        if int(host[0]) < 0 or int(host[-1]) > num_rows or bool((host.diff() < 0).any()):
            raise ValueError(f"ptr must be non-decreasing row offsets within [0, {num_rows}]")
        self.first_row, self.end_row = int(host[0]), int(host[-1])
        self.num_blocks = host.numel() - 1
        self.sizes = host.diff() * d                      # [C] elements per block (CPU)
        self.device = device
        self.ptr = ptr.to(device)
        large = (self.sizes > SMALL_MAX).nonzero().flatten()
        tiles = (self.sizes[large] + TILE - 1) // TILE    # [L] tiles per large block
        first_tile = tiles.cumsum(0) - tiles
        tile_large = torch.repeat_interleave(torch.arange(large.numel()), tiles)
        tile_offset = (torch.arange(tile_large.numel()) - first_tile[tile_large]) * TILE
        self.num_large, self.num_tiles = large.numel(), tile_large.numel()
        self.large, self.large_sizes = large.to(device), self.sizes[large].to(device)   # [L]
        self.tile_large, self.tile_offset = tile_large.to(device), tile_offset.to(device)  # [T]
        self.sub_large = self.tile_large.repeat_interleave(TILE_WARPS)   # [S = 8 T] large block of a subtile
        self.sub_first = (first_tile.to(device) * TILE_WARPS)[self.sub_large]  # [S] its block's first subtile

    @cached_property
    def device_sizes(self) -> Tensor:
        """[C] elements per block, on the device."""
        return self.sizes.to(self.device)


def _blocks(ptr: Tensor, num_rows: int, d: int, device: torch.device) -> _Blocks:
    return _MEMO.get([ptr], ("blocks", num_rows, d, device), lambda: _Blocks(ptr, num_rows, d, device))


def _on_device(k: Tensor, device: torch.device) -> Tensor:
    if k.device == device:
        return k
    return _MEMO.get([k], ("copy", device), lambda: k.to(device))


def _ones(blocks: _Blocks, ptr: Tensor, k: Tensor, num_rows: int, d: int, device: torch.device) -> tuple[Tensor, int]:
    """(start [C] on the device: position in col of each block's first one, nnz = the total)."""
    def build():
        sizes = blocks.sizes if k.device.type == "cpu" else blocks.device_sizes
        ones = k.clamp(min=0).minimum(sizes)  # [C] ones per block, on k's device
        nnz = int(ones.sum())                 # a device -> host read when k lives on the GPU
        return (ones.cumsum(0) - ones).to(device), nnz

    return _MEMO.get([ptr, k], ("ones", num_rows, d, device), build)


def _select_large(theta: Tensor, blocks: _Blocks, k: Tensor, slope: float, csr: bool):
    """The radix select of the large blocks: (state [L, 5], ties_before [S], ones_before [S] or
    None): per subtile, the keys == K and (CSR form) the ones of its block in the subtiles before."""
    empty = torch.empty(0, dtype=torch.long, device=theta.device)
    if blocks.num_tiles == 0:
        return empty, empty, empty
    long = dict(dtype=torch.long, device=theta.device)
    state = torch.zeros(blocks.num_large, STATE_COLS, **long)
    hist = torch.zeros(blocks.num_large, BINS, **long)
    counts = torch.empty(blocks.num_tiles * TILE_WARPS, 2, **long)
    cuda_library.call("top_mask_select", theta, blocks.ptr, k, theta.shape[1], float(slope), blocks.num_large,
                      blocks.large, blocks.num_tiles, blocks.tile_large, blocks.tile_offset, state, hist, counts,
                      TILE)
    gt, eq = counts.unbind(1)
    ties = _segment_exclusive_cumsum(eq, blocks.sub_first)
    if not csr:
        return state, ties, None
    need = k[blocks.large].clamp(min=0).minimum(blocks.large_sizes) - state[:, STATE_GT]  # [L] ties taken
    ones = gt + (need[blocks.sub_large] - ties).clamp(min=0).minimum(eq)
    return state, ties, _segment_exclusive_cumsum(ones, blocks.sub_first)


def _segment_exclusive_cumsum(x: Tensor, first: Tensor) -> Tensor:
    """Exclusive cumsum of x [S] within segments of consecutive entries; first [S]: the index of
    each entry's segment start."""
    before = x.cumsum(0) - x
    return before - before[first]
