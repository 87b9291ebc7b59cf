"""The ``cpu`` backend (C++ / OpenMP extension ``fastmetamer._C``) against the reference ops.

SPEC §7 tolerance: error against a float64 run of the reference at most 2x (outputs) / 3x
(gradients) the error of the float32 reference, plus a floor of a couple of float32 roundings of
the magnitude each entry is computed from (|A|.|x| for an aggregation, ...; see
``common.assert_close_to_float64``). Gradients are also checked against torch.autograd of the
float64 reference forward.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastmetamer.ops import activations, dispatch

if not dispatch.is_available("cpu"):
    pytest.skip("cpu backend (fastmetamer._C) not built", allow_module_level=True)

from fastmetamer.ops.aggregate import cpu as agg_cpu  # noqa: E402
from fastmetamer.ops.aggregate import reference as agg_ref  # noqa: E402
from fastmetamer.ops.loss import cpu as loss_cpu  # noqa: E402
from fastmetamer.ops.loss import reference as loss_ref  # noqa: E402
from fastmetamer.ops.update import cpu as upd_cpu  # noqa: E402
from fastmetamer.ops.update import reference as upd_ref  # noqa: E402

try:
    from .common import (AdamMagnitudes, aggregate_magnitudes, assert_close_to_float64, backward_magnitudes,
                         check_thresholds_and_csr, csr_cases, loss_magnitudes, propagate_magnitudes, propagate_problem,
                         random_csr, transpose_csr)
except ImportError:  # tests/ops is not a package: pytest puts it on sys.path
    from common import (AdamMagnitudes, aggregate_magnitudes, assert_close_to_float64, backward_magnitudes,
                        check_thresholds_and_csr, csr_cases, loss_magnitudes, propagate_magnitudes, propagate_problem,
                        random_csr, transpose_csr)

ACTS = activations.ACTIVATIONS
FAST = settings(deadline=None, max_examples=12, derandomize=True)
# (n, m, f, num_edges, seed) always checked: a single node (with and without its self loop), no
# edges, and a hub-heavy square graph with a feature count that is not a multiple of 8
SINGLE_NODE, SINGLE_LOOP, NO_EDGES, HUBS = (1, 1, 3, 0, 0), (1, 1, 9, 1, 1), (6, 4, 5, 0, 2), (30, 30, 17, 95, 3)
NARROW = (40, 40, 7, 125, 4)  # hubs, 7 features: the fixed-width sums of a last layer's classes


def _problem(n, m, f, num_edges, seed, with_bias, with_residual):
    gen = torch.Generator().manual_seed(seed + 1)
    rowptr, col, weight = random_csr(n, m, num_edges, seed)
    x = torch.randn(m, f, generator=gen)
    bias = torch.randn(f, generator=gen) if with_bias else None
    residual = torch.randn(n, f, generator=gen) if with_residual else None
    grad_out = torch.randn(n, f, generator=gen)
    return rowptr, col, weight, x, bias, residual, grad_out


def _d(t):
    return None if t is None else t.double()


# ----------------------------------------------------------------------------- aggregate
@pytest.mark.parametrize("act", ACTS)
@FAST
@given(case=csr_cases(), with_bias=st.booleans(), with_residual=st.booleans())
@example(case=HUBS, with_bias=True, with_residual=True)
@example(case=SINGLE_LOOP, with_bias=True, with_residual=True)
@example(case=NO_EDGES, with_bias=True, with_residual=False)
@example(case=SINGLE_NODE, with_bias=False, with_residual=False)
@example(case=NARROW, with_bias=False, with_residual=True)
def test_aggregate_forward(act, case, with_bias, with_residual):
    n, m, f, num_edges, seed = case
    rowptr, col, weight, x, bias, residual, _ = _problem(n, m, f, num_edges, seed, with_bias, with_residual)
    out, saved = agg_cpu.aggregate_forward(rowptr, col, weight, x, bias, act, residual)
    out32, saved32 = agg_ref.aggregate_forward(rowptr, col, weight, x, bias, act, residual)
    out64, saved64 = agg_ref.aggregate_forward(rowptr, col, weight.double(), x.double(), _d(bias), act,
                                               _d(residual))
    assert out.dtype == torch.float32 and out.is_contiguous()
    pre_mag, out_mag = aggregate_magnitudes(rowptr, col, weight, x, bias, act, residual)
    assert_close_to_float64(out, out32, out64, 2, out_mag, name=f"aggregate_forward[{act}]")
    pre64 = agg_ref.spmm(rowptr, col, weight.double(), x.double()) + (0 if bias is None else bias.double())
    if act == "none":
        assert saved.numel() == 0
    elif act == "relu":
        assert saved.dtype == torch.uint8 and saved.shape == saved32.shape
        decided = pre64.abs() > 1e-5  # away from 0 the sign cannot depend on rounding
        got = activations.unpack_bits(saved, f)
        assert torch.equal(got[decided], (pre64 > 0)[decided])
        assert torch.equal(saved[decided.all(1)], saved32[decided.all(1)])
    else:
        assert saved.dtype == torch.float32 and saved.shape == (n, f)
        assert_close_to_float64(saved, saved32, saved64, 2, pre_mag, name=f"saved pre [{act}]")


@pytest.mark.parametrize("f", [*range(1, 9), 15, 16, 17, 32, 63, 64, 65])
def test_aggregate_every_fixed_width(f):
    """Each width with compile-time sums (1-7, 16, 32, 64 features, no activation) and the general
    widths beside them, forward (bias, residual) and backward, against the float64 reference on a
    hub-heavy graph."""
    n, m, num_edges, seed = 40, 40, 125, 10 + f
    rowptr, col, weight, x, bias, residual, grad_out = _problem(n, m, f, num_edges, seed, True, True)
    out, _ = agg_cpu.aggregate_forward(rowptr, col, weight, x, bias, "none", residual)
    out32, _ = agg_ref.aggregate_forward(rowptr, col, weight, x, bias, "none", residual)
    out64, _ = agg_ref.aggregate_forward(rowptr, col, weight.double(), x.double(), _d(bias), "none", _d(residual))
    _, out_mag = aggregate_magnitudes(rowptr, col, weight, x, bias, "none", residual)
    assert_close_to_float64(out, out32, out64, 2, out_mag, name=f"aggregate_forward f={f}")
    t_rowptr, t_col, t_weight = transpose_csr(rowptr, col, weight, m)
    empty = torch.empty(0)
    gx = agg_cpu.aggregate_backward(t_rowptr, t_col, t_weight, grad_out, empty, "none")
    gx32 = agg_ref.aggregate_backward(t_rowptr, t_col, t_weight, grad_out, empty, "none")
    gx64 = agg_ref.aggregate_backward(t_rowptr, t_col, t_weight.double(), grad_out.double(), empty, "none")
    gx_mag = agg_ref.spmm(t_rowptr, t_col, t_weight.double().abs(), grad_out.double().abs())
    assert_close_to_float64(gx, gx32, gx64, 3, gx_mag, name=f"aggregate_backward f={f}")


@pytest.mark.parametrize("act", ACTS)
@FAST
@given(case=csr_cases(), extras=st.booleans(), skip_loops=st.booleans())
@example(case=HUBS, extras=True, skip_loops=True)
@example(case=SINGLE_LOOP, extras=True, skip_loops=True)
@example(case=SINGLE_LOOP, extras=False, skip_loops=False)
@example(case=NO_EDGES, extras=True, skip_loops=False)
@example(case=SINGLE_NODE, extras=False, skip_loops=True)
def test_propagate_forward(act, case, extras, skip_loops):
    """Unit-weight propagation with row scales, a self term and bias, self loops kept or left out."""
    n, _, f, num_edges, seed = case
    args = propagate_problem(n, f, num_edges, seed, extras)
    out = agg_cpu.propagate_forward(*args, act=act, skip_loops=skip_loops)
    out32 = agg_ref.propagate_forward(*args, act=act, skip_loops=skip_loops)
    out64 = agg_ref.propagate_forward(*[a if a is None or not a.is_floating_point() else a.double() for a in args],
                                      act=act, skip_loops=skip_loops)
    assert out.dtype == torch.float32 and out.shape == (n, f)
    assert_close_to_float64(out, out32, out64, 2, propagate_magnitudes(agg_ref, args, act, skip_loops),
                            name=f"propagate_forward[{act}]")


def test_propagate_forward_skips_only_self_loops():
    """Row 0 reads itself twice and node 1 once: skip_loops drops the first two entries alone."""
    rowptr, col = torch.tensor([0, 3, 3]), torch.tensor([0, 0, 1])
    x = torch.tensor([[1.0], [10.0]])
    for module in (agg_cpu, agg_ref):
        assert module.propagate_forward(rowptr, col, x, skip_loops=True)[:, 0].tolist() == [10.0, 0.0]
        assert module.propagate_forward(rowptr, col, x)[:, 0].tolist() == [12.0, 0.0]


def test_propagate_forward_thread_count_independent():
    """The parallel path (rows split between threads) gives bit-identical results."""
    args = propagate_problem(3000, 21, 40_000, 5, True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(agg_cpu.propagate_forward(*args, act="relu", skip_loops=True))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


def _saved_from(pre64, act):
    """The saved state of a forward whose pre-activation is ``pre64``, in float32 (so that every
    backend sees the same act' and only the backward pass itself is compared)."""
    if act == "relu":
        return activations.pack_bits(pre64 > 0)
    return activations.save_for_backward(pre64.float(), act)


def _autograd64(rowptr, col, weight, x, bias, act, grad_out):
    """d <out, grad_out> / d x and / d weight through the float64 reference forward."""
    x64 = x.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    out64, _ = agg_ref.aggregate_forward(rowptr, col, w64, x64, _d(bias), act)
    (out64 * grad_out.double()).sum().backward()
    pre64 = agg_ref.spmm(rowptr, col, weight.double(), x.double()) + (0 if bias is None else bias.double())
    return x64.grad, w64.grad, pre64


@pytest.mark.parametrize("act", ACTS)
@FAST
@given(case=csr_cases(), with_bias=st.booleans())
@example(case=HUBS, with_bias=True)
@example(case=SINGLE_LOOP, with_bias=False)
@example(case=NO_EDGES, with_bias=True)
@example(case=SINGLE_NODE, with_bias=False)
@example(case=NARROW, with_bias=True)
def test_aggregate_backward_and_edge_grad(act, case, with_bias):
    n, m, f, num_edges, seed = case
    rowptr, col, weight, x, bias, _, grad_out = _problem(n, m, f, num_edges, seed, with_bias, False)
    t_rowptr, t_col, t_weight = transpose_csr(rowptr, col, weight, m)
    gx64, gw64, pre64 = _autograd64(rowptr, col, weight, x, bias, act, grad_out)
    saved = _saved_from(pre64, act)
    saved64 = activations.save_for_backward(pre64, act) if act != "relu" else saved

    gx_mag, gw_mag = backward_magnitudes(rowptr, col, weight, x, grad_out, pre64, act, t_rowptr, t_col, t_weight)
    gx = agg_cpu.aggregate_backward(t_rowptr, t_col, t_weight, grad_out, saved, act)
    gx32 = agg_ref.aggregate_backward(t_rowptr, t_col, t_weight, grad_out, saved, act)
    gx_ref64 = agg_ref.aggregate_backward(t_rowptr, t_col, t_weight.double(), grad_out.double(), saved64, act)
    assert gx.shape == (m, f)
    assert_close_to_float64(gx, gx32, gx_ref64, 3, gx_mag, name=f"aggregate_backward[{act}]")
    assert_close_to_float64(gx, gx32, gx64, 3, gx_mag, name=f"aggregate_backward vs autograd [{act}]")

    gw = agg_cpu.edge_grad(rowptr, col, grad_out, saved, act, x)
    gw32 = agg_ref.edge_grad(rowptr, col, grad_out, saved, act, x)
    gw_ref64 = agg_ref.edge_grad(rowptr, col, grad_out.double(), saved64, act, x.double())
    assert gw.shape == col.shape
    assert_close_to_float64(gw, gw32, gw_ref64, 3, gw_mag, name=f"edge_grad[{act}]")
    assert_close_to_float64(gw, gw32, gw64, 3, gw_mag, name=f"edge_grad vs autograd [{act}]")


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_aggregate_large_parallel_paths(act):
    """Big enough for the parallel, edge-balanced path and (gelu) the materialised grad_pre."""
    n, f = 3000, 37
    rowptr, col, weight, x, bias, residual, grad_out = _problem(n, n, f, 8 * n, 5, True, True)
    out, saved = agg_cpu.aggregate_forward(rowptr, col, weight, x, bias, act, residual)
    out32, _ = agg_ref.aggregate_forward(rowptr, col, weight, x, bias, act, residual)
    out64, _ = agg_ref.aggregate_forward(rowptr, col, weight.double(), x.double(), bias.double(), act,
                                         residual.double())
    assert_close_to_float64(out, out32, out64, 2, aggregate_magnitudes(rowptr, col, weight, x, bias, act, residual)[1],
                            name="forward")
    t_rowptr, t_col, t_weight = transpose_csr(rowptr, col, weight, n)
    gx64, gw64, pre64 = _autograd64(rowptr, col, weight, x, bias, act, grad_out)
    gx_mag, gw_mag = backward_magnitudes(rowptr, col, weight, x, grad_out, pre64, act, t_rowptr, t_col, t_weight)
    saved = _saved_from(pre64, act)
    gx = agg_cpu.aggregate_backward(t_rowptr, t_col, t_weight, grad_out, saved, act)
    gx32 = agg_ref.aggregate_backward(t_rowptr, t_col, t_weight, grad_out, saved, act)
    assert_close_to_float64(gx, gx32, gx64, 3, gx_mag, name="backward")
    gw = agg_cpu.edge_grad(rowptr, col, grad_out, saved, act, x)
    gw32 = agg_ref.edge_grad(rowptr, col, grad_out, saved, act, x)
    assert_close_to_float64(gw, gw32, gw64, 3, gw_mag, name="edge_grad")


def test_aggregate_thread_count_independent():
    n, f = 2000, 16
    rowptr, col, weight, x, bias, residual, grad_out = _problem(n, n, f, 6 * n, 3, True, False)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, max(2, old)):
            torch.set_num_threads(threads)
            out, saved = agg_cpu.aggregate_forward(rowptr, col, weight, x, bias, "tanh")
            t = transpose_csr(rowptr, col, weight, n)
            results.append((out, saved, agg_cpu.aggregate_backward(*t, grad_out, saved, "tanh")))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("act", ACTS)
@FAST
@given(case=csr_cases(), with_bias=st.booleans(), num_comp=st.integers(1, 4))
@example(case=HUBS, with_bias=True, num_comp=3)
@example(case=SINGLE_LOOP, with_bias=True, num_comp=1)
@example(case=NO_EDGES, with_bias=False, num_comp=2)
@example(case=SINGLE_NODE, with_bias=False, num_comp=1)
def test_matched_loss(act, case, with_bias, num_comp):
    T, m, f, num_edges, seed = case
    rowptr, col, weight, x, bias, _, _ = _problem(T, m, f, num_edges, seed, with_bias, False)
    gen = torch.Generator().manual_seed(seed + 7)
    target = torch.randn(T, f, generator=gen)
    component = torch.randint(0, num_comp, (T,), generator=gen)
    scale = torch.rand(num_comp, generator=gen) * 5 + 0.5
    loss, grad_pre = loss_cpu.matched_loss(rowptr, col, weight, x, target, component, scale, bias, act)
    loss32, grad32 = loss_ref.matched_loss(rowptr, col, weight, x, target, component, scale, bias, act)
    loss64, grad64 = loss_ref.matched_loss(rowptr, col, weight.double(), x.double(), target.double(), component,
                                           scale.double(), _d(bias), act)
    assert loss.shape == (num_comp,) and grad_pre.shape == (T, f)
    loss_mag, grad_mag = loss_magnitudes(rowptr, col, weight, x, target, component, scale, bias, act)
    assert_close_to_float64(loss, loss32, loss64, 2, loss_mag, name=f"matched_loss[{act}]")
    assert_close_to_float64(grad_pre, grad32, grad64, 3, grad_mag, name=f"matched_loss grad_pre[{act}]")
    # grad_pre is the gradient of sum(loss) w.r.t. the pre-activation (autograd, float64)
    pre64 = agg_ref.spmm(rowptr, col, weight.double(), x.double()) + (0 if bias is None else bias.double())
    pre64.requires_grad_(True)
    diff = activations.apply(pre64, act) - target.double()
    per_row = diff.pow(2).sum(1)
    total = (per_row.new_zeros(num_comp).index_add(0, component, per_row) / scale.double()).sum()
    (auto64,) = torch.autograd.grad(total, pre64, allow_unused=True)
    if auto64 is None:
        auto64 = torch.zeros_like(pre64)
    assert_close_to_float64(grad_pre, grad32, auto64, 3, grad_mag, name=f"grad_pre vs autograd [{act}]")


def test_matched_loss_deterministic():
    T, m, f = 1500, 1800, 24
    rowptr, col, weight, x, bias, _, _ = _problem(T, m, f, 9 * T, 11, True, False)
    target = torch.randn(T, f)
    component = torch.randint(0, 5, (T,))
    scale = torch.rand(5) + 1
    first = loss_cpu.matched_loss(rowptr, col, weight, x, target, component, scale, bias, "elu")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = loss_cpu.matched_loss(rowptr, col, weight, x, target, component, scale, bias, "elu")
    finally:
        torch.set_num_threads(old)
    again = loss_cpu.matched_loss(rowptr, col, weight, x, target, component, scale, bias, "elu")
    for a, b, c in zip(first, single, again):
        assert torch.equal(a, b) and torch.equal(a, c)


# ----------------------------------------------------------------------------- top_mask
def _check_top_mask(theta, ptr, k, slope, name=""):
    hard, thr = upd_cpu.top_mask(theta, ptr, k, slope)
    ref_hard, thr32 = upd_ref.top_mask(theta, ptr, k, slope)
    _, thr64 = upd_ref.top_mask(theta.double(), ptr, k, slope)
    assert hard.shape == theta.shape and thr.shape == (theta.shape[0],)
    assert ((hard == 0) | (hard == 1)).all(), name
    prob = torch.sigmoid(slope * theta)
    for c in range(ptr.numel() - 1):
        lo, hi = int(ptr[c]), int(ptr[c + 1])
        if hi == lo:
            continue
        h, p = hard[lo:hi].reshape(-1), prob[lo:hi].reshape(-1)
        kc = min(max(int(k[c]), 0), h.numel())
        assert int(h.sum()) == kc, f"{name}: block {c} has {int(h.sum())} ones, want {kc}"
        if 0 < kc < h.numel():  # the ones are the k largest
            assert p[h == 1].min() >= p[h == 0].max() - 1e-6, f"{name}: block {c}"
        # the same entries as the reference (ties in memory order) wherever P ties exactly when
        # theta does (saturated P ties distinct logits, which the kernel still orders by theta)
        if slope == 0 or p.unique().numel() == theta[lo:hi].unique().numel():
            assert torch.equal(h, ref_hard[lo:hi].reshape(-1)), f"{name}: block {c} differs from the reference"
    check_thresholds_and_csr(hard, thr, ptr, upd_cpu.top_mask_csr(theta, ptr, k, slope), thr32, thr64, name)
    return hard, thr


@FAST
@given(rows=st.integers(1, 30), d=st.integers(1, 25), blocks=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       ties=st.booleans(), slope=st.sampled_from([-2.0, 0.0, 0.5, 1.0, 4.0, 40.0]))
def test_top_mask_blocks(rows, d, blocks, seed, ties, slope):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(rows, d, generator=gen)
    if ties:  # many exactly equal values, including ties at the k-th value
        theta = torch.round(theta * 2) / 2
    cuts = torch.sort(torch.randint(0, rows + 1, (blocks - 1,), generator=gen)).values
    ptr = torch.cat([torch.tensor([0]), cuts, torch.tensor([rows])])
    sizes = ptr.diff() * d
    k = (torch.rand(blocks, generator=gen) * (sizes + 3)).long() - 1   # includes -1, 0, size, size + 1
    k[0] = 0 if blocks > 1 else k[0]
    _check_top_mask(theta, ptr, k, slope, name="blocks")


def test_top_mask_per_row():
    F, d = 300, 143
    theta = torch.randn(F, d)
    theta[::7] = torch.round(theta[::7])             # rows with ties
    ptr = torch.arange(F + 1)
    k = torch.randint(0, d + 1, (F,))
    k[:3] = torch.tensor([0, d, 1])
    _check_top_mask(theta, ptr, k, 2.0, name="per row")


@pytest.mark.parametrize("kind", ["plain", "ties", "saturated", "k0", "kall"])
def test_top_mask_huge_block(kind):
    """One block large enough for the intra-block parallel passes (incl. the parallel tie pass)."""
    F, d = 500, 701
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(F, d, generator=gen)
    slope = 1.0
    if kind == "ties":
        theta = torch.round(theta * 4) / 4
    if kind == "saturated":                          # P == 1.0 exactly for many entries
        slope = 30.0
    k = {"k0": 0, "kall": F * d}.get(kind, int(0.013 * F * d))
    _check_top_mask(theta, torch.tensor([0, F]), torch.tensor([k]), slope, name=kind)
    # a second block next to the huge one, and uncovered trailing rows (mask 0, threshold 0)
    ptr = torch.tensor([0, F - 50, F - 10])
    hard, thr = _check_top_mask(theta, ptr, torch.tensor([k // 2, 17]), slope, name=kind + " +block")
    assert (hard[F - 10:] == 0).all() and (thr[F - 10:] == 0).all()


@pytest.mark.parametrize("k", [300, 20_000])
def test_top_mask_sample_misled(k):
    """The kernel guesses a bound for the k largest from a strided sample of the block; here the
    sampled entries (7,104 of them) hold the block's largest value, 2.0. For k = 20,000 the guess
    lets too few entries through (the kernel must select among all entries); for k = 300 it lets
    exactly the sampled entries through and the k largest are all ties at 2.0 (the first k in
    memory order win). Either way the ones are the reference's."""
    F, d = 500, 701
    cnt = F * d
    samples = min(cnt // 4, max(64, min(int(12.0 * cnt ** 0.5), 1 << 15)))
    gen = torch.Generator().manual_seed(5)
    theta = torch.rand(cnt, generator=gen)
    theta[((torch.arange(samples, dtype=torch.float64) + 0.5) * cnt / samples).long()] = 2.0
    _check_top_mask(theta.reshape(F, d), torch.tensor([0, F]), torch.tensor([k]), 1.0, name=f"misled k={k}")


# ----------------------------------------------------------------------------- linear_input_grad
@pytest.mark.parametrize("F, f, d", [(0, 4, 9), (1, 1, 1), (5, 0, 7), (37, 64, 12_288), (250, 16, 1_000),
                                     (1_500, 3, 70)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_linear_input_grad(F, f, d, accumulate):
    """out (+)= grad @ W^T against the float64 product, with row counts that fill one tile, end in
    a partial tile (d = 12,288: tiles of 8 rows; d = 1,000: 98 rows) or hold no row, and an
    inner size of zero (the product is zero)."""
    gen = torch.Generator().manual_seed(F + 7 * d)
    grad, weight = torch.randn(F, f, generator=gen), torch.randn(d, f, generator=gen)
    start = torch.randn(F, d, generator=gen)
    outs = [start.clone(), start.clone(), start.double()]
    upd_cpu.linear_input_grad(outs[0], grad, weight, accumulate)
    upd_ref.linear_input_grad(outs[1], grad, weight, accumulate)
    upd_ref.linear_input_grad(outs[2], grad.double(), weight.double(), accumulate)
    magnitude = grad.double().abs() @ weight.double().abs().t() + (start.double().abs() if accumulate else 0)
    assert_close_to_float64(outs[0], outs[1], outs[2], 2, magnitude, name="linear_input_grad")


@pytest.mark.parametrize("out_shape, grad_shape, weight_shape, match", [
    ((4, 9), (4, 3), (9, 2), "weight"), ((5, 9), (4, 3), (9, 3), "out"), ((4, 9), (4,), (9, 3), "grad")])
def test_linear_input_grad_rejects_bad_shapes(out_shape, grad_shape, weight_shape, match):
    with pytest.raises(ValueError, match=match):
        upd_cpu.linear_input_grad(torch.zeros(out_shape), torch.zeros(grad_shape), torch.zeros(weight_shape), False)


# ----------------------------------------------------------------------------- adam_ste_update
def _gradient(form: str, F: int, d: int, gen: torch.Generator, big: bool = False):
    """(grad_x or None, grad_product or None, float64 total, float64 magnitude) of a gradient
    given densely, as the product grad_rows @ W^T (f = 5 hidden units), or both."""
    f = 5
    grad_x = torch.randn(F, d, generator=gen) * 0.1 if form in ("dense", "both") else None
    product = None
    if form in ("product", "both"):
        product = (torch.randn(F, f, generator=gen) * 0.1, torch.randn(d, f, generator=gen) * (1 if big else 0.3))
    total = torch.zeros(F, d, dtype=torch.float64)
    magnitude = torch.zeros(F, d, dtype=torch.float64)
    if grad_x is not None:
        total, magnitude = total + grad_x.double(), magnitude + grad_x.double().abs()
    if product is not None:
        rows, weight = (t.double() for t in product)
        total, magnitude = total + rows @ weight.t(), magnitude + rows.abs() @ weight.abs().t()
    return grad_x, product, total, magnitude


@FAST
@given(F=st.integers(1, 40), d=st.integers(1, 70), seed=st.integers(0, 2**31 - 1),
       slope=st.sampled_from([0.5, 1.0, 3.0]), bound=st.sampled_from([None, 4.0, "tight"]),
       form=st.sampled_from(["dense", "product", "both"]))
@example(F=7, d=33, seed=5, slope=3.0, bound="tight", form="dense")
@example(F=7, d=12_288, seed=5, slope=1.0, bound=None, form="both")  # product tiles of 8 rows
@example(F=37, d=12_288, seed=6, slope=3.0, bound=4.0, form="product")
def test_adam_ste_update(F, d, seed, slope, bound, form):
    """The fused step against the float32 and float64 references, with the gradient given
    densely, as the first layer's product (formed tile by tile inside the update), or both."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(F, d, generator=gen)
    if bound == "tight":  # the clamp is active on many entries (logits beyond it from the start)
        bound = 0.8 / slope
        theta = theta * 2 * bound
    elif bound is not None:
        bound = bound / slope  # LOGIT_BOUND / s, as the fused path passes it
    state = [theta.clone(), torch.zeros(F, d), torch.zeros(F, d)]        # cpu
    state32 = [theta.clone(), torch.zeros(F, d), torch.zeros(F, d)]      # reference float32
    state64 = [theta.double(), torch.zeros(F, d).double(), torch.zeros(F, d).double()]
    mags = AdamMagnitudes(*state64)
    hyper = dict(lr=0.05 if bound is None else 0.5, beta1=0.9, beta2=0.999, eps=1e-8, slope=slope, margin=0.1,
                 bound=bound)
    for step in range(1, 6):
        grad, product, total64, magnitude = _gradient(form, F, d, gen)
        threshold = torch.rand(F, generator=gen) * 0.4 + 0.3
        margin_scale = torch.rand(F, generator=gen)
        active = torch.rand(F, generator=gen) < 0.7
        before = state[0].clone()
        args = dict(step=step, threshold=threshold, margin_scale=margin_scale, active=active, grad_product=product,
                    **hyper)
        upd_cpu.adam_ste_update(state[0], grad, *state[1:], **args)
        upd_ref.adam_ste_update(state32[0], grad, *state32[1:], **args)
        args64 = dict(step=step, threshold=threshold.double(), margin_scale=margin_scale.double(), active=active,
                      **hyper)
        mags.step(state64[0], total64, *state64[1:], grad_mag=magnitude, **args64)
        upd_ref.adam_ste_update(state64[0], total64, *state64[1:], **args64)
        for name, a, b, c, mag in zip(("theta", "exp_avg", "exp_avg_sq"), state, state32, state64, mags.magnitudes()):
            assert_close_to_float64(a, b, c, 2, mag, name=f"{name} step {step}")
        if bound is None:
            assert torch.equal(state[0][~active], before[~active])  # inactive rows do not move
        else:  # every row, active or not, is clamped to the bound (the projection of FeatureParam)
            want = before[~active].clamp(-float(torch.tensor(bound)), float(torch.tensor(bound)))
            assert torch.equal(state[0][~active], want)
            assert state[0].abs().max() <= torch.tensor(bound, dtype=torch.float32)
            assert torch.equal(state[0].abs() == torch.tensor(bound, dtype=torch.float32),
                               state32[0].abs() == torch.tensor(bound, dtype=torch.float32))


def test_adam_ste_update_clamp():
    """The clamp runs after the Adam step, on every row, to exactly the float32 bound; None and
    inf do not clamp; NaN stays NaN."""
    F, d = 6, 5
    theta = torch.linspace(-3, 3, F * d).view(F, d).contiguous()
    theta[0, 0] = float("nan")
    grad = torch.ones(F, d)
    active = torch.tensor([True, False, True, True, False, True])
    kw = dict(step=1, lr=1.0, beta1=0.9, beta2=0.999, eps=1e-12, slope=1.0, threshold=torch.full((F,), 0.5),
              margin=0.0, margin_scale=torch.zeros(F), active=active)
    for bound in (None, float("inf"), 4.0 / 3.0, 0.0):
        for backend in (upd_cpu, upd_ref):
            th, m, v = theta.clone(), torch.zeros(F, d), torch.zeros(F, d)
            backend.adam_ste_update(th, grad, m, v, **kw, bound=bound)
            # one Adam step from zero moments moves every active logit by lr * (1 - tiny): down by ~1
            moved = torch.where(active.unsqueeze(1), theta - 1.0, theta)
            b = float("inf") if bound is None else float(torch.tensor(bound, dtype=torch.float32))
            want = moved.clamp(-b, b)
            torch.testing.assert_close(th, want, atol=1e-6, rtol=0, equal_nan=True, msg=f"{backend.__name__} {bound}")
            assert th[0, 0].isnan()
            assert (th[1:].abs() <= b).all()
    with pytest.raises(ValueError, match="bound"):
        upd_cpu.adam_ste_update(theta.clone(), grad, torch.zeros(F, d), torch.zeros(F, d), **kw, bound=-1.0)
    with pytest.raises(ValueError, match="bound"):
        upd_ref.adam_ste_update(theta.clone(), grad, torch.zeros(F, d), torch.zeros(F, d), **kw,
                                bound=float("nan"))


@pytest.mark.parametrize("bound", [None, 1.25])
def test_adam_ste_update_large_parallel(bound):
    F, d = 2708, 143
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(F, d, generator=gen)
    grad = torch.randn(F, d, generator=gen) * 1e-3
    hard, threshold = upd_cpu.top_mask(theta, torch.tensor([0, F]), torch.tensor([int(0.02 * F * d)]), 2.0)
    args = dict(step=3, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, slope=2.0, threshold=threshold, margin=0.2,
                margin_scale=torch.full((F,), 0.01), active=torch.rand(F, generator=gen) < 0.9, bound=bound)
    m1, m2 = torch.rand(F, d, generator=gen) * 1e-3, torch.rand(F, d, generator=gen) * 1e-6
    fast = [theta.clone(), m1.clone(), m2.clone()]
    ref32 = [theta.clone(), m1.clone(), m2.clone()]
    ref64 = [theta.double(), m1.double(), m2.double()]
    mags = AdamMagnitudes(*ref64)
    upd_cpu.adam_ste_update(fast[0], grad, *fast[1:], **args)
    upd_ref.adam_ste_update(ref32[0], grad, *ref32[1:], **args)
    args64 = dict(args, threshold=threshold.double(), margin_scale=args["margin_scale"].double())
    mags.step(ref64[0], grad.double(), *ref64[1:], **args64)
    upd_ref.adam_ste_update(ref64[0], grad.double(), *ref64[1:], **args64)
    for a, b, c, mag in zip(fast, ref32, ref64, mags.magnitudes()):
        assert_close_to_float64(a, b, c, 2, mag, name="large adam")
    if bound is not None:
        assert (fast[0].abs() == bound).sum() > 1000  # the clamp was active


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_value_error():
    rowptr, col, weight = random_csr(5, 5, 12, 0)
    x = torch.randn(5, 3)
    t = transpose_csr(rowptr, col, weight, 5)
    bad_calls = [
        lambda: agg_cpu.aggregate_forward(rowptr, col, weight, x.double()),               # dtype
        lambda: agg_cpu.aggregate_forward(rowptr.int(), col, weight, x),                  # index dtype
        lambda: agg_cpu.aggregate_forward(rowptr, col, weight[:-1], x),                   # E mismatch
        lambda: agg_cpu.aggregate_forward(rowptr, col, weight, x, torch.randn(4)),        # bias length
        lambda: agg_cpu.aggregate_forward(rowptr, col, weight, x, None, "relu", torch.randn(4, 3)),
        lambda: agg_cpu.aggregate_forward(rowptr, col, weight, x.t()),                    # non-contiguous
        lambda: agg_cpu.aggregate_forward(rowptr, col, weight, x, act="swish"),           # activation
        lambda: agg_cpu.aggregate_forward(rowptr, col, weight, x[:2]),                    # col out of range
        lambda: agg_cpu.aggregate_forward(torch.cat([rowptr[:-1], rowptr[-1:] + 1]), col, weight, x),  # end != E
        lambda: agg_cpu.aggregate_forward(rowptr.flip(0), col, weight, x),                # not monotone
        lambda: agg_cpu.aggregate_backward(*t, torch.randn(5, 3), torch.zeros(5, 2, dtype=torch.uint8), "relu"),
        lambda: agg_cpu.aggregate_backward(*t, torch.randn(5, 3), torch.randn(5, 4), "tanh"),
        lambda: agg_cpu.aggregate_backward(*t, torch.randn(1, 3), torch.empty(0), "none"),  # dst ids >= 1
        lambda: agg_cpu.edge_grad(rowptr, col, torch.randn(5, 4), torch.empty(0), "none", x),
        lambda: loss_cpu.matched_loss(rowptr, col, weight, x, torch.randn(5, 2), torch.zeros(5, dtype=torch.long),
                                      torch.ones(1)),
        lambda: loss_cpu.matched_loss(rowptr, col, weight, x, torch.randn(5, 3), torch.full((5,), 3),
                                      torch.ones(2)),                                     # component >= C
        lambda: loss_cpu.matched_loss(rowptr, col, weight, x, torch.randn(5, 3), torch.zeros(5), torch.ones(1)),
        lambda: upd_cpu.top_mask(x, torch.tensor([0, 5]), torch.tensor([1, 2]), 1.0),      # k length
        lambda: upd_cpu.top_mask(x, torch.tensor([0, 6]), torch.tensor([1]), 1.0),         # ptr beyond F
        lambda: upd_cpu.top_mask(x.double(), torch.tensor([0, 5]), torch.tensor([1]), 1.0),
        lambda: agg_cpu.propagate_forward(rowptr, col, x, row_scale=torch.ones(4)),         # scale length
        lambda: agg_cpu.propagate_forward(rowptr, col, x, self_x=torch.ones(5, 2)),         # self width
        lambda: agg_cpu.propagate_forward(rowptr, col, x, self_scale=torch.ones(5)),        # scale, no self
        lambda: agg_cpu.propagate_forward(rowptr, col, x[:2]),                              # col out of range
        lambda: agg_cpu.propagate_forward(rowptr, col, x, bias=torch.ones(3).double()),     # dtype
    ]
    F, d = 4, 3
    good = dict(step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, slope=1.0, threshold=torch.zeros(F),
                margin=0.1, margin_scale=torch.zeros(F), active=torch.ones(F, dtype=torch.bool))
    z = torch.zeros(F, d)
    bad_calls += [
        lambda: upd_cpu.adam_ste_update(z.clone(), z, z.clone(), z.clone(), **dict(good, active=torch.ones(F))),
        lambda: upd_cpu.adam_ste_update(z.clone(), z, z.clone(), z.clone(), **dict(good, threshold=torch.zeros(3))),
        lambda: upd_cpu.adam_ste_update(z.clone(), torch.zeros(F, 2), z.clone(), z.clone(), **good),
        lambda: upd_cpu.adam_ste_update(z.clone(), z, z.clone(), z.clone(), **dict(good, step=0)),
        lambda: upd_cpu.adam_ste_update(z.clone(), z, z.clone(), z.clone(), **dict(good, bound=-0.5)),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"bad call {i} did not raise")


def test_dispatch_finds_cpu_backend():
    assert dispatch.resolve("auto") == "cpu"
    assert dispatch.get("aggregate", "cpu") is agg_cpu
    assert dispatch.get("loss", "cpu") is loss_cpu
    assert dispatch.get("update", "cpu") is upd_cpu


# ----------------------------------------------------------------------------- tangents
@FAST
@given(case=csr_cases(), tangents=st.integers(1, 5))
@example(case=HUBS, tangents=3)
@example(case=SINGLE_LOOP, tangents=2)
@example(case=NO_EDGES, tangents=4)
@example(case=SINGLE_NODE, tangents=1)
def test_aggregate_tangents(case, tangents):
    """A @ x[p] for P tangents x [P, m, f] in one pass over the CSR, against float64."""
    n, m, f, num_edges, seed = case
    rowptr, col, weight = random_csr(n, m, num_edges, seed)
    x = torch.randn(tangents, m, f, generator=torch.Generator().manual_seed(seed + 3))
    out = agg_cpu.aggregate_tangents(rowptr, col, weight, x)
    out32 = agg_ref.aggregate_tangents(rowptr, col, weight, x)
    out64 = agg_ref.aggregate_tangents(rowptr, col, weight.double(), x.double())
    assert out.shape == (tangents, n, f) and out.dtype == torch.float32 and out.is_contiguous()
    magnitude = agg_ref.aggregate_tangents(rowptr, col, weight.double().abs(), x.double().abs())
    assert_close_to_float64(out, out32, out64, 2, magnitude, name="aggregate_tangents")
    # the contract: tangent p is the plain aggregation of x[p]
    want = torch.stack([agg_ref.spmm(rowptr, col, weight.double(), x[p].double()) for p in range(tangents)])
    torch.testing.assert_close(out64, want)
    with pytest.raises(ValueError):
        agg_cpu.aggregate_tangents(rowptr, col, weight, x[0])  # x must be [P, m, f]
