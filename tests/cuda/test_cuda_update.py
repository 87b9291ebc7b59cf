"""The ``cuda`` backend of the update ops (``csrc/cuda/update.cu``) against the reference.

top_mask / top_mask_csr: the mask must equal the reference's exactly (the same k[c] entries per
block, ties taken in row-major order). The reference runs on the same GPU, where torch.sigmoid
computes P as the kernels do; besides, the logits are drawn on a grid (or as distinct, evenly
spaced values) with |s theta| <= 10, so two different logits give P values several float32 ulps
apart and the order of P, with its exact ties, does not hang on the last bit of exp. Thresholds:
SPEC §7 tolerance against a float64 reference on the CPU. adam_ste_update: SPEC §7 tolerance
(``common.AdamMagnitudes``) against float64.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops.common import AdamMagnitudes, assert_close_to_float64, check_thresholds_and_csr

from fastmetamer.ops import cuda_library
from fastmetamer.ops.update import cuda as upd_cuda
from fastmetamer.ops.update import reference as upd_ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not cuda_library.available(),
                       reason="needs a GPU and the built CUDA library (python fastmetamer/ops/cuda_library.py)"),
]

DEVICE = torch.device("cuda")
FAST = settings(deadline=None, max_examples=15, derandomize=True)
SMALL_MAX, TILE = upd_cuda.SMALL_MAX, upd_cuda.TILE


def grid_logits(shape, slope: float, gen: torch.Generator, step: float = 1 / 16) -> torch.Tensor:
    """Logits on a grid of ``step`` (CPU) with |slope theta| <= 10."""
    theta = torch.round(torch.randn(*shape, generator=gen) * 2 / step) * step
    return theta.clamp(-10 / abs(slope), 10 / abs(slope)) if slope else theta


def distinct_logits(rows: int, d: int, gen: torch.Generator, half_range: float) -> torch.Tensor:
    """rows * d distinct logits evenly spaced in [-half_range, half_range), shuffled (CPU)."""
    n = rows * d
    return ((torch.randperm(n, generator=gen).double() - n / 2) * (2 * half_range / n)).float().view(rows, d)


def _check_top_mask(theta, ptr, k, slope, name="", ptr_on_gpu=True, k_on_gpu=True):
    """theta, ptr, k on the CPU. Runs both forms on the GPU (ptr, k there or on the CPU) and checks
    them against the reference; returns (hard, threshold) on the CPU."""
    theta_dev = theta.to(DEVICE)
    args = (theta_dev, ptr.to(DEVICE) if ptr_on_gpu else ptr, k.to(DEVICE) if k_on_gpu else k, slope)
    hard, thr = (t.cpu() for t in upd_cuda.top_mask(*args))
    ref_hard, thr32 = (t.cpu() for t in upd_ref.top_mask(theta_dev, ptr, k, slope))
    _, thr64 = upd_ref.top_mask(theta.double(), ptr, k, slope)
    assert hard.shape == theta.shape and thr.shape == (theta.shape[0],), name
    for c in range(ptr.numel() - 1):
        lo, hi = int(ptr[c]), int(ptr[c + 1])
        want = min(max(int(k[c]), 0), (hi - lo) * theta.shape[1])
        assert int(hard[lo:hi].sum()) == want, f"{name}: block {c} has {int(hard[lo:hi].sum())} ones, want {want}"
    assert torch.equal(hard, ref_hard), f"{name}: the mask differs from the reference"
    outside = torch.ones(theta.shape[0], dtype=torch.bool)
    outside[int(ptr[0]):int(ptr[-1])] = False
    assert not thr[outside].any() and not hard[outside].any(), f"{name}: rows outside the blocks"
    csr = tuple(t.cpu() for t in upd_cuda.top_mask_csr(*args))
    check_thresholds_and_csr(hard, thr, ptr, csr, thr32, thr64, name)
    return hard, thr


# ----------------------------------------------------------------------------- top_mask
@FAST
@given(rows=st.integers(1, 40), d=st.integers(1, 40), blocks=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       ties=st.booleans(), slope=st.sampled_from([-2.0, 0.0, 0.5, 1.0, 4.0, 40.0]), covers=st.booleans())
def test_top_mask_blocks(rows, d, blocks, seed, ties, slope, covers):
    """Random blocks (empty ones, blocks of both classes: up to 1600 elements), k in -1 .. size + 1,
    and rows outside every block."""
    gen = torch.Generator().manual_seed(seed)
    theta = grid_logits((rows, d), slope, gen, step=1 / 2 if ties else 1 / 64)
    cuts = torch.sort(torch.randint(0, rows + 1, (blocks + 1,), generator=gen)).values
    if covers:
        cuts[0], cuts[-1] = 0, rows
    sizes = cuts.diff() * d
    k = (torch.rand(blocks, generator=gen) * (sizes + 3)).long() - 1
    _check_top_mask(theta, cuts, k, slope, name="blocks", ptr_on_gpu=bool(seed % 2), k_on_gpu=bool(seed % 3))


@pytest.mark.parametrize("d", [100, SMALL_MAX, SMALL_MAX + 1])
def test_top_mask_per_row(d):
    """Per-row mode (one block per row; with d > SMALL_MAX every row is a large block), ptr on the
    CPU as FusedBinaryFeatures passes it, k on the GPU."""
    F = 3000 if d == 100 else 150
    gen = torch.Generator().manual_seed(d)
    theta = grid_logits((F, d), 2.0, gen, step=1 / 64)
    theta[::7] = torch.round(theta[::7])  # rows with many ties
    k = torch.randint(0, d + 1, (F,), generator=gen)
    k[:4] = torch.tensor([0, d, 1, d - 1])
    _check_top_mask(theta, torch.arange(F + 1), k, 2.0, name=f"per row d={d}", ptr_on_gpu=False)


@pytest.mark.parametrize("kind", ["distinct", "ties", "saturated", "all_equal", "k0", "k1", "kall", "kmore"])
def test_top_mask_huge_block(kind):
    """One block of 180 600 elements (23 tiles of TILE: every large-block pass runs on many CTAs),
    then the same next to a small block and uncovered rows."""
    F, d = 600, 301
    gen = torch.Generator().manual_seed(3)
    slope = 1.0
    theta = grid_logits((F, d), slope, gen, step=1 / 4)
    if kind == "distinct":
        theta = distinct_logits(F, d, gen, half_range=5.0)
    elif kind == "saturated":  # s theta in multiples of 5 up to +-100: P == 1.0 (and 0.0) for many entries
        slope = 40.0
        theta = torch.round(torch.rand(F, d, generator=gen) * 40 - 20) / 8
    elif kind == "all_equal":
        theta = torch.full((F, d), 0.3)
    n = F * d
    k = {"k0": 0, "k1": 1, "kall": n, "kmore": n + 7}.get(kind, int(0.013 * n))
    _check_top_mask(theta, torch.tensor([0, F]), torch.tensor([k]), slope, name=kind)
    if kind == "saturated":  # the k-th value inside the P == 1.0 ties, then inside the P == 0.0 ties
        ones, zeros = int((slope * theta >= 20).sum()), int((slope * theta <= -90).sum())
        for kk in (ones // 2, n - zeros // 2):
            _check_top_mask(theta, torch.tensor([0, F]), torch.tensor([kk]), slope, name=f"saturated k={kk}")
    ptr = torch.tensor([0, F - 50, F - 49, F - 10])  # a large block, a one-row (small) block, uncovered rows
    hard, thr = _check_top_mask(theta, ptr, torch.tensor([k // 2, 17, 40]), slope, name=kind + " +blocks",
                                k_on_gpu=False)
    assert not hard[F - 10:].any() and not thr[F - 10:].any()


def test_top_mask_several_million():
    """A block of 2.5 M distinct logits (306 tiles) and one of 2.5 M logits with many ties."""
    gen = torch.Generator().manual_seed(5)
    F, d = 2500, 1000
    theta = distinct_logits(F, d, gen, half_range=2.0)
    _check_top_mask(theta, torch.tensor([0, F]), torch.tensor([25_013]), 1.0, name="2.5M distinct")
    theta = grid_logits((F, d), 1.0, gen, step=1 / 8)
    _check_top_mask(theta, torch.tensor([0, 1200, F]), torch.tensor([12_345, 1_000_000]), 1.0, name="2.5M ties")


def test_top_mask_all_tied_blocks():
    """Every P equal: the ones are the first k entries in memory order, threshold = P."""
    for F, d in ((3, 7), (40, 300)):  # a small and a large block
        theta = torch.full((F, d), -0.7)
        for k in (1, 5, F * d // 2, F * d - 1):
            hard, thr = _check_top_mask(theta, torch.tensor([0, F]), torch.tensor([k]), 1.5, name=f"tied {F}x{d}")
            assert torch.equal(hard.flatten(), (torch.arange(F * d) < k).float())
            prob = torch.sigmoid(1.5 * theta[:, 0].to(DEVICE)).cpu()
            torch.testing.assert_close(thr, prob, rtol=2**-23, atol=0)


def test_top_mask_nan_ranks_first():
    """NaN logits rank above every P and tie among themselves (as torch.sort orders them)."""
    gen = torch.Generator().manual_seed(6)
    for F, d in ((6, 9), (30, 200)):
        theta = grid_logits((F, d), 1.0, gen)
        theta.view(-1)[torch.randperm(F * d, generator=gen)[:5]] = float("nan")
        ptr, k = torch.tensor([0, F]), torch.tensor([3 + F])
        hard, _ = upd_cuda.top_mask(theta.to(DEVICE), ptr, k, 1.0)
        assert torch.equal(hard.cpu(), upd_ref.top_mask(theta.to(DEVICE), ptr, k, 1.0)[0].cpu())
        assert hard.cpu()[theta.isnan()].all()


def test_top_mask_degenerate_shapes():
    """No rows, no columns, no blocks, only empty blocks."""
    cases = [
        (torch.zeros(0, 4), torch.tensor([0]), torch.zeros(0, dtype=torch.long)),
        (torch.zeros(0, 4), torch.tensor([0, 0]), torch.tensor([3])),
        (torch.zeros(5, 0), torch.tensor([0, 5]), torch.tensor([2])),
        (torch.randn(5, 3), torch.tensor([2]), torch.zeros(0, dtype=torch.long)),
        (torch.randn(5, 3), torch.tensor([1, 1, 1]), torch.tensor([4, 0])),
    ]
    for theta, ptr, k in cases:
        hard, thr = upd_cuda.top_mask(theta.to(DEVICE), ptr, k, 1.0)
        rowptr, col, thr_csr = upd_cuda.top_mask_csr(theta.to(DEVICE), ptr, k, 1.0)
        assert hard.shape == theta.shape and not hard.any() and not thr.any() and not thr_csr.any()
        assert rowptr.shape == (theta.shape[0] + 1,) and not rowptr.any() and col.numel() == 0


def test_top_mask_deterministic():
    gen = torch.Generator().manual_seed(7)
    theta = grid_logits((700, 130), 1.0, gen, step=1 / 4).to(DEVICE)  # ties everywhere
    for ptr in (torch.tensor([0, 700]), torch.arange(701), torch.tensor([0, 3, 300, 301, 700])):
        k = (ptr.diff() * 130 * 0.05).long() + 1
        first = upd_cuda.top_mask(theta, ptr, k, 1.0) + upd_cuda.top_mask_csr(theta, ptr, k, 1.0)
        again = upd_cuda.top_mask(theta, ptr, k, 1.0) + upd_cuda.top_mask_csr(theta, ptr, k, 1.0)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_top_mask_sees_in_place_changes_of_ptr_and_k():
    """The host-side split of ptr and the CSR sizes are memoised per tensor and version counter."""
    gen = torch.Generator().manual_seed(8)
    theta = grid_logits((50, 40), 1.0, gen).to(DEVICE)
    for on_gpu in (False, True):
        ptr, k = torch.tensor([0, 10, 50]), torch.tensor([7, 30])
        if on_gpu:
            ptr, k = ptr.to(DEVICE), k.to(DEVICE)
        for _ in range(2):
            rowptr, col, _ = upd_cuda.top_mask_csr(theta, ptr, k, 1.0)
            assert col.numel() == int(k.sum())
            ptr[1] += 15
            k.mul_(3)
        hard, _ = upd_cuda.top_mask(theta, ptr, k, 1.0)
        assert torch.equal(hard.cpu(), upd_ref.top_mask(theta, ptr.cpu(), k.cpu(), 1.0)[0].cpu())


# ----------------------------------------------------------------------------- adam_ste_update
def _adam_run(F, d, seed, slope, bound, steps=5):
    """``steps`` steps of the cuda backend, the float32 and the float64 reference from the same
    state; checks the SPEC §7 tolerance after each and the rows that must not move."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(F, d, generator=gen)
    if bound == "tight":  # the clamp is active on many entries (logits beyond it from the start)
        bound = 0.8 / slope
        theta = theta * 2 * bound
    elif bound is not None:
        bound = bound / slope  # LOGIT_BOUND / s, as the fused path passes it
    fast = [theta.to(DEVICE, copy=True), torch.zeros(F, d, device=DEVICE), torch.zeros(F, d, device=DEVICE)]
    ref32 = [theta.clone(), torch.zeros(F, d), torch.zeros(F, d)]
    ref64 = [theta.double(), torch.zeros(F, d).double(), torch.zeros(F, d).double()]
    mags = AdamMagnitudes(*ref64)
    hyper = dict(lr=0.05 if bound is None else 0.5, beta1=0.9, beta2=0.999, eps=1e-8, slope=slope, margin=0.1,
                 bound=bound)
    limit = None if bound is None else torch.tensor(bound, dtype=torch.float32)
    for step in range(1, steps + 1):
        grad = torch.randn(F, d, generator=gen) * 0.1
        threshold = torch.rand(F, generator=gen) * 0.4 + 0.3
        margin_scale = torch.rand(F, generator=gen)
        active = torch.rand(F, generator=gen) < 0.7
        before = fast[0].cpu()
        upd_cuda.adam_ste_update(fast[0], grad.to(DEVICE), *fast[1:], step=step, threshold=threshold.to(DEVICE),
                                 margin_scale=margin_scale.to(DEVICE), active=active.to(DEVICE), **hyper)
        upd_ref.adam_ste_update(ref32[0], grad, *ref32[1:], step=step, threshold=threshold,
                                margin_scale=margin_scale, active=active, **hyper)
        args64 = dict(step=step, threshold=threshold.double(), margin_scale=margin_scale.double(), active=active,
                      **hyper)
        mags.step(ref64[0], grad.double(), *ref64[1:], **args64)
        upd_ref.adam_ste_update(ref64[0], grad.double(), *ref64[1:], **args64)
        got = [t.cpu() for t in fast]
        for name, a, b, c, mag in zip(("theta", "exp_avg", "exp_avg_sq"), got, ref32, ref64, mags.magnitudes()):
            assert_close_to_float64(a, b, c, 2, mag, name=f"{name} step {step}")
        if limit is None:
            assert torch.equal(got[0][~active], before[~active])  # inactive rows do not move
        else:  # every row, active or not, is clamped to the float32 bound
            assert torch.equal(got[0][~active], before[~active].clamp(-float(limit), float(limit)))
            assert got[0].abs().max() <= limit
            if F * d <= 10_000:  # on more entries, one may land within an ulp of the bound (FMA rounding)
                assert torch.equal(got[0].abs() == limit, ref32[0].abs() == limit)


@FAST
@given(F=st.integers(1, 40), d=st.integers(1, 70), seed=st.integers(0, 2**31 - 1),
       slope=st.sampled_from([0.5, 1.0, 3.0]), bound=st.sampled_from([None, 4.0, "tight"]))
def test_adam_ste_update(F, d, seed, slope, bound):
    _adam_run(F, d, seed, slope, bound)


@pytest.mark.parametrize("bound", [None, 4.0, "tight"])
def test_adam_ste_update_large(bound):
    """1.5 M elements, more than the kernel's grid has threads (4096 CTAs x 256): every thread
    walks several elements, its row advancing across rows of odd width (301)."""
    _adam_run(5000, 301, 11, 2.0, bound, steps=2)


def test_adam_ste_update_clamp_and_nan():
    """The clamp runs after the Adam step, on every row, to exactly the float32 bound; None and
    inf do not clamp; NaN stays NaN."""
    F, d = 6, 5
    theta = torch.linspace(-3, 3, F * d).view(F, d).contiguous()
    theta[0, 0] = float("nan")
    grad = torch.ones(F, d)
    active = torch.tensor([True, False, True, True, False, True])
    kw = dict(step=1, lr=1.0, beta1=0.9, beta2=0.999, eps=1e-12, slope=1.0, margin=0.0)
    for bound in (None, float("inf"), 4.0 / 3.0, 0.0):
        th = theta.to(DEVICE, copy=True)
        upd_cuda.adam_ste_update(th, grad.to(DEVICE), torch.zeros(F, d, device=DEVICE),
                                 torch.zeros(F, d, device=DEVICE), **kw, threshold=torch.full((F,), 0.5, device=DEVICE),
                                 margin_scale=torch.zeros(F, device=DEVICE), active=active.to(DEVICE), bound=bound)
        th = th.cpu()
        moved = torch.where(active.unsqueeze(1), theta - 1.0, theta)  # one step from zero moments: ~ -lr
        b = float("inf") if bound is None else float(torch.tensor(bound, dtype=torch.float32))
        torch.testing.assert_close(th, moved.clamp(-b, b), atol=1e-6, rtol=0, equal_nan=True, msg=f"bound {bound}")
        assert th[0, 0].isnan() and (th[1:].abs() <= b).all()


def test_adam_ste_update_deterministic():
    gen = torch.Generator().manual_seed(12)
    F, d = 300, 77
    theta, grad = torch.randn(F, d, generator=gen), torch.randn(F, d, generator=gen)
    kw = dict(step=4, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, slope=2.0, margin=0.2, bound=1.5,
              threshold=torch.rand(F, generator=gen).to(DEVICE), margin_scale=torch.rand(F, generator=gen).to(DEVICE),
              active=(torch.rand(F, generator=gen) < 0.8).to(DEVICE))
    runs = []
    for _ in range(2):
        state = [theta.to(DEVICE, copy=True), torch.full((F, d), 1e-3, device=DEVICE),
                 torch.full((F, d), 1e-6, device=DEVICE)]
        upd_cuda.adam_ste_update(state[0], grad.to(DEVICE), *state[1:], **kw)
        runs.append(state)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_value_error():
    x = torch.randn(5, 3, device=DEVICE)
    ptr, k = torch.tensor([0, 5]), torch.tensor([2])
    F, d = 4, 3
    z = torch.zeros(F, d, device=DEVICE)
    good = dict(step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, slope=1.0, margin=0.1,
                threshold=torch.zeros(F, device=DEVICE), margin_scale=torch.zeros(F, device=DEVICE),
                active=torch.ones(F, dtype=torch.bool, device=DEVICE))
    bad_calls = [
        lambda: upd_cuda.top_mask(x.cpu(), ptr, k, 1.0),                                  # theta on the CPU
        lambda: upd_cuda.top_mask(x.double(), ptr, k, 1.0),                               # dtype
        lambda: upd_cuda.top_mask(x.t(), torch.tensor([0, 3]), k, 1.0),                   # not contiguous
        lambda: upd_cuda.top_mask(x[0], ptr, k, 1.0),                                     # 1-d theta
        lambda: upd_cuda.top_mask(x, ptr.int(), k, 1.0),                                  # ptr dtype
        lambda: upd_cuda.top_mask(x, torch.tensor([], dtype=torch.long), k[:0], 1.0),     # ptr empty
        lambda: upd_cuda.top_mask(x, ptr, torch.tensor([1, 2]), 1.0),                     # k length
        lambda: upd_cuda.top_mask(x, ptr, k.float(), 1.0),                                # k dtype
        lambda: upd_cuda.top_mask(x, torch.tensor([0, 6]), k, 1.0),                       # ptr beyond F
        lambda: upd_cuda.top_mask(x, torch.tensor([-1, 5]), k, 1.0),                      # ptr below 0
        lambda: upd_cuda.top_mask_csr(x, torch.tensor([0, 4, 2]), torch.tensor([1, 1]), 1.0),  # decreasing
        lambda: upd_cuda.top_mask_csr(x, torch.tensor([0, 4, 2], device=DEVICE), torch.tensor([1, 1]), 1.0),
        lambda: upd_cuda.adam_ste_update(z.clone(), z, z.clone(), z.clone(), **dict(good, active=good["threshold"])),
        lambda: upd_cuda.adam_ste_update(z.clone(), z, z.clone(), z.clone(), **dict(good, threshold=z[0])),
        lambda: upd_cuda.adam_ste_update(z.clone(), z[:, :2].contiguous(), z.clone(), z.clone(), **good),
        lambda: upd_cuda.adam_ste_update(z.clone(), z, z.clone().t().contiguous().t(), z.clone(), **good),
        lambda: upd_cuda.adam_ste_update(z.clone(), z.cpu(), z.clone(), z.clone(), **good),   # another device
        lambda: upd_cuda.adam_ste_update(z.clone(), z, z.clone(), z.clone(), **dict(good, step=0)),
        lambda: upd_cuda.adam_ste_update(z.clone(), z, z.clone(), z.clone(), **dict(good, bound=-0.5)),
        lambda: upd_cuda.adam_ste_update(z.clone(), z, z.clone(), z.clone(), **dict(good, bound=float("nan"))),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"bad call {i} did not raise")
