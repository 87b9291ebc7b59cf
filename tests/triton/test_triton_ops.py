"""Triton backend of the fused ops against the reference (SPEC §7 tolerance).

Run in its own process: ``TRITON_INTERPRET=1 python -m pytest tests/triton -q`` (the interpreter
must be selected before triton is imported), or on a machine with a CUDA device.
"""
import importlib.util
import os
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("triton tests need a CUDA device or TRITON_INTERPRET=1 (in their own process)",
                allow_module_level=True)
pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from ops.common import (AdamMagnitudes, aggregate_magnitudes, assert_close_to_float64,  # noqa: E402
                        backward_magnitudes, check_edge_softmax, csr_cases, loss_magnitudes, propagate_magnitudes,
                        propagate_problem, random_csr, softmax_problem, spmm_abs, transpose_csr)

from fastmetamer.ops import activations, dispatch  # noqa: E402
from fastmetamer.ops.aggregate import reference as agg_ref  # noqa: E402
from fastmetamer.ops.aggregate import triton as agg_tri  # noqa: E402
from fastmetamer.ops.loss import reference as loss_ref  # noqa: E402
from fastmetamer.ops.loss import triton as loss_tri  # noqa: E402
from fastmetamer.ops.update import reference as upd_ref  # noqa: E402
from fastmetamer.ops.update import triton as upd_tri  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")
ACTS = activations.ACTIVATIONS
# (n, m, f, num_edges, seed, bias+residual): single node, self loops + duplicates on one node,
# no edges, a hub with an isolated row, two feature blocks (f > 128), few sources (duplicates).
CASES = [
    (1, 1, 1, 0, 0, False),
    (1, 1, 5, 6, 1, True),
    (6, 6, 9, 0, 2, True),
    (24, 24, 19, 77, 3, True),
    (5, 12, 130, 20, 4, False),
    (25, 3, 8, 60, 5, True),
]


def dev(t):
    return None if t is None else t.to(DEVICE)


def host(t):
    return t.cpu()


def _inputs(n, m, f, num_edges, seed, extras):
    rowptr, col, weight = random_csr(n, m, num_edges, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(m, f, generator=gen)
    bias = torch.randn(f, generator=gen) * 0.5 if extras else None
    residual = torch.randn(n, f, generator=gen) if extras else None
    grad_out = torch.randn(n, f, generator=gen)
    return rowptr, col, weight, x, bias, residual, grad_out


def _f64(t):
    return None if t is None else t.double()


def check_aggregate(n, m, f, num_edges, seed, extras, act):
    rowptr, col, w, x, bias, res, gout = _inputs(n, m, f, num_edges, seed, extras)
    t_rowptr, t_col, t_w = transpose_csr(rowptr, col, w, m)
    graph = (rowptr, col)
    pre_mag, out_mag = aggregate_magnitudes(rowptr, col, w, x, bias, act, res)
    pre64 = agg_ref.aggregate_forward(*graph, w.double(), x.double(), _f64(bias))[0]
    gx_mag, eg_mag = backward_magnitudes(rowptr, col, w, x, gout, pre64, act, t_rowptr, t_col, t_w)
    for fast_dtype in (torch.float32, torch.float64):
        def cast(t, dtype):
            return None if t is None else t.to(dtype)

        # --- forward
        ref = {dt: agg_ref.aggregate_forward(*graph, w.to(dt), x.to(dt), cast(bias, dt), act, cast(res, dt))
               for dt in (torch.float32, torch.float64)}
        out, saved = agg_tri.aggregate_forward(*map(dev, graph), dev(w.to(fast_dtype)), dev(x.to(fast_dtype)),
                                               dev(cast(bias, fast_dtype)), act, dev(cast(res, fast_dtype)))
        assert out.dtype == fast_dtype and out.device.type == DEVICE.type
        assert_close_to_float64(host(out), ref[torch.float32][0], ref[torch.float64][0], 2, out_mag, name=f"out {act}")
        if act == "none":
            assert saved.numel() == 0
        elif act == "relu":
            assert saved.dtype == torch.uint8 and saved.shape == (n, -(-f // 8))
            bits, ref_bits = activations.unpack_bits(host(saved), f), pre64 > 0
            decided = pre64.abs() > 1e-5
            assert torch.equal(bits[decided], ref_bits[decided])
            # padding bits of the last byte stay zero
            assert torch.equal(activations.unpack_bits(host(saved), -(-f // 8) * 8)[:, f:],
                               torch.zeros(n, -(-f // 8) * 8 - f, dtype=torch.bool))
        else:
            assert saved.shape == (n, f)
            assert_close_to_float64(host(saved), ref[torch.float32][1], ref[torch.float64][1], 2, pre_mag,
                                    name=f"saved {act}")

        # --- backward over the transpose and edge gradient, fed the reference's saved state
        def saved_of(dt):
            return ref[torch.float32][1] if act == "relu" else ref[dt][1]

        back = {dt: agg_ref.aggregate_backward(t_rowptr, t_col, t_w.to(dt), gout.to(dt), saved_of(dt), act)
                for dt in (torch.float32, torch.float64)}
        fast = agg_tri.aggregate_backward(dev(t_rowptr), dev(t_col), dev(t_w.to(fast_dtype)),
                                          dev(gout.to(fast_dtype)), dev(saved_of(fast_dtype)), act)
        assert fast.shape == (m, f) and fast.dtype == fast_dtype
        assert_close_to_float64(host(fast), back[torch.float32], back[torch.float64], 3, gx_mag, name=f"grad_x {act}")

        eg = {dt: agg_ref.edge_grad(*graph, gout.to(dt), saved_of(dt), act, x.to(dt))
              for dt in (torch.float32, torch.float64)}
        fast = agg_tri.edge_grad(*map(dev, graph), dev(gout.to(fast_dtype)), dev(saved_of(fast_dtype)), act,
                                 dev(x.to(fast_dtype)))
        assert fast.shape == (col.numel(),) and fast.dtype == fast_dtype
        assert_close_to_float64(host(fast), eg[torch.float32], eg[torch.float64], 3, eg_mag, name=f"edge_grad {act}")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}-m{}-f{}-e{}".format(*c[:4]))
def test_aggregate_fixed_cases(case, act):
    check_aggregate(*case, act)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(csr_cases(max_nodes=24, max_features=12), st.sampled_from(ACTS), st.booleans())
def test_aggregate_random(case, act, extras):
    check_aggregate(*case, extras, act)


# Hub rows longer than the split size: in the first case row 0 holds 660 of the 2400 edges (three
# chunks of SPLIT = 256) and, with 4 sources, every row of the transpose is a hub too; in the second
# row 0 holds 437 edges (two chunks) and f = 130 makes two feature blocks.
HUB_CASES = [(30, 4, 9, 2400, 11, True), (6, 6, 130, 1200, 12, False)]


def test_hub_cases_are_split():
    for n, m, _, num_edges, seed, _ in HUB_CASES:
        assert random_csr(n, m, num_edges, seed)[0].diff().max() > agg_tri.SPLIT
    n, m, _, num_edges, seed, _ = HUB_CASES[0]
    rowptr, col, w = random_csr(n, m, num_edges, seed)
    assert rowptr.diff().max() > 2 * agg_tri.SPLIT
    assert (transpose_csr(rowptr, col, w, m)[0].diff() > 2 * agg_tri.SPLIT).all()


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])  # the three saved-state formats
def test_aggregate_hub_rows(act):
    check_aggregate(*HUB_CASES[0], act)


def test_aggregate_hub_rows_wide():
    check_aggregate(*HUB_CASES[1], "relu")


def test_aggregate_hub_rows_deterministic():
    rowptr, col, w, x, bias, _, _ = _inputs(*HUB_CASES[1])
    args = [dev(t) for t in (rowptr, col, w, x, bias)]
    first, again = agg_tri.aggregate_forward(*args, "tanh")[0], agg_tri.aggregate_forward(*args, "tanh")[0]
    assert torch.equal(first, again)


@pytest.mark.parametrize("case", [(30, 4, 5, 2400, 13), (5, 3, 4, 0, 14), (1, 1, 2, 1, 15)],
                         ids=["hub", "no-edges", "single"])
def test_aggregate_tangents(case):
    """A @ x[p] for P = 3 tangents in one pass, against float64."""
    n, m, f, num_edges, seed = case
    rowptr, col, w = random_csr(n, m, num_edges, seed)
    x = torch.randn(3, m, f, generator=torch.Generator().manual_seed(seed))
    want = {dt: agg_ref.aggregate_tangents(rowptr, col, w.to(dt), x.to(dt)) for dt in (torch.float32, torch.float64)}
    magnitude = torch.stack([spmm_abs(rowptr, col, w, x[p]) for p in range(3)])
    for dt in (torch.float32, torch.float64):
        out = agg_tri.aggregate_tangents(dev(rowptr), dev(col), dev(w.to(dt)), dev(x.to(dt)))
        assert out.shape == (3, n, f) and out.dtype == dt and out.is_contiguous()
        assert_close_to_float64(host(out), want[torch.float32], want[torch.float64], 2, magnitude,
                                name=f"tangents {dt}")


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}-m{}-f{}-e{}".format(*c[:4]))
def test_propagate_forward(case, act):
    """Unit-weight propagation (row scales, self term, bias, self loops left out or not)."""
    n, _, f, num_edges, seed, extras = case
    args = propagate_problem(n, f, num_edges, seed, extras)
    for skip_loops in (False, True):
        out = agg_tri.propagate_forward(*[dev(a) for a in args], act=act, skip_loops=skip_loops)
        out32 = agg_ref.propagate_forward(*args, act=act, skip_loops=skip_loops)
        out64 = agg_ref.propagate_forward(*[a if a is None or not a.is_floating_point() else a.double()
                                            for a in args], act=act, skip_loops=skip_loops)
        assert_close_to_float64(host(out), out32, out64, 2, propagate_magnitudes(agg_ref, args, act, skip_loops),
                                name=f"propagate_forward[{act}]")


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_propagate_forward_hub_rows(act):
    test_propagate_forward(HUB_CASES[0], act)


def check_matched_loss(n, m, f, num_edges, seed, extras, act, num_comp=3):
    rowptr, col, w, x, bias, _, _ = _inputs(n, m, f, num_edges, seed, extras)
    gen = torch.Generator().manual_seed(seed + 7)
    target = torch.randn(n, f, generator=gen)
    component = torch.randint(0, num_comp, (n,), generator=gen)  # unsorted; a component may be empty
    scale = torch.rand(num_comp, generator=gen) * 3 + 0.5
    ref = {dt: loss_ref.matched_loss(rowptr, col, w.to(dt), x.to(dt), target.to(dt), component, scale.to(dt),
                                     None if bias is None else bias.to(dt), act)
           for dt in (torch.float32, torch.float64)}
    loss_mag, grad_mag = loss_magnitudes(rowptr, col, w, x, target, component, scale, bias, act)
    for dt in (torch.float32, torch.float64):
        loss, grad_pre = loss_tri.matched_loss(dev(rowptr), dev(col), dev(w.to(dt)), dev(x.to(dt)),
                                               dev(target.to(dt)), dev(component), dev(scale.to(dt)),
                                               None if bias is None else dev(bias.to(dt)), act)
        assert loss.shape == (num_comp,) and grad_pre.shape == (n, f) and loss.dtype == dt
        assert_close_to_float64(host(loss), ref[torch.float32][0], ref[torch.float64][0], 2, loss_mag,
                                name=f"loss {act}")
        assert_close_to_float64(host(grad_pre), ref[torch.float32][1], ref[torch.float64][1], 3, grad_mag,
                                name=f"grad_pre {act}")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=["single", "hub", "wide"])
def test_matched_loss(case, act):
    check_matched_loss(*case, act)


@pytest.mark.parametrize("act", ["none", "relu", "elu"])
def test_matched_loss_hub_rows(act):
    check_matched_loss(*HUB_CASES[0], act)


def test_matched_loss_large_component():
    """Two components of ~300 target rows each: their per-component sums are split rows too."""
    check_matched_loss(600, 20, 3, 1200, 16, True, "tanh", num_comp=2)


def test_matched_loss_no_edges_and_deterministic():
    check_matched_loss(6, 6, 9, 0, 2, True, "gelu", num_comp=4)
    rowptr, col, w, x, bias, _, _ = _inputs(24, 24, 19, 77, 3, True)
    component = torch.randint(0, 2, (24,))
    args = (dev(rowptr), dev(col), dev(w), dev(x), dev(torch.randn(24, 19)), dev(component),
            dev(torch.ones(2)), dev(bias), "tanh")
    first, again = loss_tri.matched_loss(*args), loss_tri.matched_loss(*args)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# ----------------------------------------------------------------------------- top_mask
def _check_top_mask(theta, ptr, k, slope, exact_reference):
    hard, threshold = upd_tri.top_mask(dev(theta), dev(ptr), dev(k), slope)
    hard, threshold = host(hard), host(threshold)
    ref_hard, ref_threshold = upd_ref.top_mask(theta, ptr, k, slope)
    assert hard.dtype == theta.dtype and hard.shape == theta.shape
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    prob = torch.sigmoid(slope * theta)
    d = theta.shape[1]
    for c in range(ptr.numel() - 1):
        lo, hi = int(ptr[c]), int(ptr[c + 1])
        if hi == lo:
            continue
        block, p = hard[lo:hi].reshape(-1), prob[lo:hi].reshape(-1)
        assert int(block.sum()) == min(max(int(k[c]), 0), (hi - lo) * d), f"block {c}"  # exactly k ones
        if 0 < block.sum() < block.numel():
            assert p[block == 1].min() >= p[block == 0].max(), f"block {c} not a top-k"
        tol = 1e-6 if theta.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(threshold[lo:hi], ref_threshold[lo:hi], atol=tol, rtol=tol)
    if exact_reference:
        assert torch.equal(hard, ref_hard)
    rowptr, col, csr_threshold = (host(t) for t in upd_tri.top_mask_csr(dev(theta), dev(ptr), dev(k), slope))
    want_rowptr, want_col = upd_ref.mask_to_csr(hard)
    assert torch.equal(rowptr, want_rowptr) and torch.equal(col, want_col)
    assert torch.equal(csr_threshold, threshold)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_mask_blocks(dtype):
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(13, 6, generator=gen, dtype=dtype)
    # blocks: an empty one, k = 0, a middle k, k = size, k > size, a one-row block
    ptr = torch.tensor([0, 2, 2, 5, 9, 11, 12, 13])
    k = torch.tensor([5, 3, 0, 11, 12, 40, 1])
    _check_top_mask(theta, ptr, k, 1.7, exact_reference=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_mask_ties_exact_k(dtype):
    gen = torch.Generator().manual_seed(1)
    values = torch.tensor([-50.0, -40.0, -1.5, 0.0, 0.7, 40.0, 50.0], dtype=dtype)  # P = 1.0 at 40 and 50
    theta = values[torch.randint(0, values.numel(), (12, 5), generator=gen)]
    ptr = torch.tensor([0, 4, 9, 12])
    for k in ([7, 11, 1], [1, 24, 14], [0, 25, 15]):
        _check_top_mask(theta, ptr, torch.tensor(k), 1.0, exact_reference=True)
    # everything tied
    _check_top_mask(torch.zeros(4, 3, dtype=dtype), torch.tensor([0, 4]), torch.tensor([5]), 2.0,
                    exact_reference=True)


def _tied_logits(rows, d, seed, dtype=torch.float32):
    """randn logits with a third of the entries 0 (P = 0.5) and a tenth 50 (P = 1.0): ties whose P
    every sigmoid implementation computes exactly (torch.sigmoid rounds one logit differently at
    different positions, so other ties may not stay ties in the reference)."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(rows, d, generator=gen, dtype=dtype)
    u = torch.rand(rows, d, generator=gen)
    return theta.masked_fill(u < 1 / 3, 0.0).masked_fill(u > 0.9, 50.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_mask_many_programs_and_chunks(dtype):
    """Hundreds of rows and several column chunks: tiles inside one block and tiles across block
    boundaries, ties spread over chunks and rows, an empty block, k = 0, k = size, k > size, a
    one-row block, k inside the ties at 1.0 and at 0.5; the CSR form equals the dense mask's."""
    rows, d = 200, 2 * upd_tri.BLOCK_D + 22
    assert rows > 4 * upd_tri.BLOCK_R
    theta = _tied_logits(rows, d, 5, dtype)
    ptr = torch.tensor([0, 3, 3, 40, 41, 90, 95, 200])
    size = ptr.diff() * d
    k = torch.stack([size[0] // 2, torch.tensor(7), torch.tensor(0), torch.tensor(100), size[4], size[5] + 3,
                     size[6] // 20])
    _check_top_mask(theta, ptr, k, 1.3, exact_reference=True)


def test_top_mask_per_row_many_programs():
    theta = _tied_logits(150, upd_tri.BLOCK_D + 9, 6)
    k = torch.randint(0, theta.shape[1] + 2, (150,), generator=torch.Generator().manual_seed(6))
    _check_top_mask(theta, torch.arange(151), k, 2.0, exact_reference=True)


def test_top_mask_csr_is_emitted_by_the_selection(monkeypatch):
    """top_mask_csr builds no dense mask and calls no nonzero(): the selection kernel writes it."""
    theta, ptr, k = _tied_logits(40, 70, 7), torch.tensor([0, 25, 40]), torch.tensor([300, 1000])
    want_rowptr, want_col = upd_ref.mask_to_csr(host(upd_tri.top_mask(dev(theta), dev(ptr), dev(k), 1.0)[0]))

    def refuse(*args, **kwargs):
        raise AssertionError("top_mask_csr went through a dense mask")

    monkeypatch.setattr(upd_tri, "top_mask", refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    monkeypatch.setattr(torch.Tensor, "nonzero", refuse)
    rowptr, col, _ = upd_tri.top_mask_csr(dev(theta), dev(ptr), dev(k), 1.0)
    monkeypatch.undo()
    assert torch.equal(host(rowptr), want_rowptr) and torch.equal(host(col), want_col)


def test_top_mask_rows_outside_blocks():
    theta = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    hard, _ = upd_tri.top_mask(dev(theta), dev(torch.tensor([0, 3])), dev(torch.tensor([4])), 1.0)
    hard = host(hard)
    assert int(hard[:3].sum()) == 4 and not hard[3:].any()


def test_top_mask_per_row():
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(9, 11, generator=gen)
    k = torch.randint(0, 12, (9,), generator=gen)
    _check_top_mask(theta, torch.arange(10), k, 3.0, exact_reference=True)


# ----------------------------------------------------------------------------- adam
@pytest.mark.parametrize("bound", [None, 0.75], ids=["no-bound", "bound"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_ste_update(dtype, bound):
    gen = torch.Generator().manual_seed(3)
    rows, d, slope, margin = 9, 7, 2.0, 0.15
    theta0 = torch.randn(rows, d, generator=gen)
    if bound is not None:  # logits beyond the bound from the start: the clamp is active
        theta0 = theta0 * 2 * bound
    ptr = torch.tensor([0, 4, 9])
    active = torch.tensor([True, False, True, True, False, True, True, True, False])
    margin_scale = torch.rand(rows, generator=gen) + 0.2
    grads = [torch.randn(rows, d, generator=gen) * 0.3 for _ in range(3)]
    hyper = dict(lr=0.05 if bound is None else 0.5, beta1=0.9, beta2=0.999, eps=1e-8, slope=slope, margin=margin,
                 bound=bound)
    states = {}
    for name, dt in (("ref32", torch.float32), ("ref64", torch.float64), ("fast", dtype)):
        on = (lambda t: dev(t)) if name == "fast" else (lambda t: t)
        states[name] = [on(theta0.to(dt).clone()), on(torch.zeros(rows, d, dtype=dt)), on(torch.zeros(rows, d, dtype=dt))]
    mags = AdamMagnitudes(*states["ref64"])
    for step, grad in enumerate(grads, start=1):
        threshold = upd_ref.top_mask(states["ref32"][0], ptr, torch.tensor([10, 12]), slope)[1]
        mags.step(*states["ref64"][:1], grad.double(), *states["ref64"][1:], step=step, threshold=threshold.double(),
                  margin_scale=margin_scale.double(), active=active, **hyper)
        for name, state in states.items():
            dt = state[0].dtype
            fn = upd_tri.adam_ste_update if name == "fast" else upd_ref.adam_ste_update
            on = (lambda t: dev(t)) if name == "fast" else (lambda t: t)
            fn(*state[:1], on(grad.to(dt)), *state[1:], step=step, threshold=on(threshold.to(dt)),
               margin_scale=on(margin_scale.to(dt)), active=on(active), **hyper)
        for i, what in enumerate(("theta", "exp_avg", "exp_avg_sq")):
            assert_close_to_float64(host(states["fast"][i]), states["ref32"][i], states["ref64"][i], 3,
                                    mags.magnitudes()[i], name=f"{what} step {step}")
    fast_theta = host(states["fast"][0])
    if bound is None:  # inactive rows keep their logits, but their moments move
        assert torch.equal(fast_theta[~active], theta0.to(dtype)[~active])
    else:  # every row, active or not, ends within the bound; inactive rows are just clamped
        limit = float(torch.tensor(bound, dtype=dtype))
        assert torch.equal(fast_theta[~active], theta0.to(dtype)[~active].clamp(-limit, limit))
        assert (fast_theta.abs() <= limit).all() and (fast_theta.abs() == limit).sum() > 10
    assert (host(states["fast"][1])[~active] != 0).any()


@pytest.mark.parametrize("with_dense", [False, True])
def test_adam_takes_the_gradient_as_a_product(with_dense):
    """A gradient given as grad_rows @ W^T (formed by one GEMM first) gives exactly what its
    dense value gives, alone or added to a dense part."""
    gen = torch.Generator().manual_seed(4)
    theta, rows = torch.randn(6, 9, generator=gen), torch.randn(6, 4, generator=gen)
    weight = torch.randn(9, 4, generator=gen)
    dense = torch.randn(6, 9, generator=gen) if with_dense else None
    total = torch.mm(rows, weight.t()) if dense is None else torch.addmm(dense, rows, weight.t())
    kw = dict(step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, slope=1.0, threshold=dev(torch.full((6,), 0.5)),
              margin=0.1, margin_scale=dev(torch.ones(6)), active=dev(torch.ones(6, dtype=torch.bool)), bound=0.6)
    by_product = [dev(theta.clone()), dev(torch.zeros(6, 9)), dev(torch.zeros(6, 9))]
    by_value = [dev(theta.clone()), dev(torch.zeros(6, 9)), dev(torch.zeros(6, 9))]
    upd_tri.adam_ste_update(by_product[0], None if dense is None else dev(dense), *by_product[1:],
                            grad_product=(dev(rows), dev(weight)), **kw)
    upd_tri.adam_ste_update(by_value[0], dev(total), *by_value[1:], **kw)
    for got, want in zip(by_product, by_value):
        assert torch.equal(host(got), host(want))


def test_adam_non_contiguous_in_place():
    theta = torch.randn(5, 8).t()  # [8, 5], not contiguous
    m, v = torch.zeros(8, 5), torch.zeros(8, 5)
    grad = torch.randn(8, 5)
    ref_theta = theta.clone()
    kw = dict(step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, slope=1.0, threshold=torch.full((8,), 0.5),
              margin=0.1, margin_scale=torch.ones(8), active=torch.ones(8, dtype=torch.bool), bound=0.6)
    upd_ref.adam_ste_update(ref_theta, grad, m.clone(), v.clone(), **kw)
    theta, m, v = dev(theta), dev(m), dev(v)
    upd_tri.adam_ste_update(theta, dev(grad), m, v, **{a: dev(b) if torch.is_tensor(b) else b for a, b in kw.items()})
    torch.testing.assert_close(host(theta), ref_theta, atol=1e-6, rtol=1e-5)
    assert (host(theta).abs() == torch.tensor(0.6)).any()


def test_adam_bad_bound():
    z = dev(torch.zeros(2, 3))
    kw = dict(step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, slope=1.0, threshold=dev(torch.zeros(2)),
              margin=0.1, margin_scale=dev(torch.ones(2)), active=dev(torch.ones(2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="bound"):
        upd_tri.adam_ste_update(z.clone(), z, z.clone(), z.clone(), **kw, bound=-1.0)


# ----------------------------------------------------------------------------- plumbing
def test_dispatch_finds_triton():
    assert dispatch.is_available("triton")
    assert dispatch.get("aggregate", "triton") is agg_tri
    assert dispatch.get("loss", "triton") is loss_tri
    assert dispatch.get("update", "triton") is upd_tri


def test_imports_cleanly_without_triton(monkeypatch):
    """With triton unimportable each backend file still imports, with AVAILABLE False."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    for module in (agg_tri, loss_tri, upd_tri):
        package = module.__name__.rsplit(".", 1)[0]
        spec = importlib.util.spec_from_file_location(f"{package}._triton_probe", module.__file__)
        probe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(probe)
        assert probe.AVAILABLE is False, module.__name__
        assert probe.triton is None


@pytest.mark.parametrize("n,heads,edges,seed", [(1, 1, 0, 0), (1, 2, 5, 1), (12, 3, 40, 2), (3, 8, 300, 3), (30, 1, 95, 4)])
def test_edge_softmax(n, heads, edges, seed):
    """Forward and backward against float64: a single node (with and without entries), zero
    weights, a row without positive weights, a hub walked in many entry blocks, eight heads."""
    check_edge_softmax(agg_tri, *softmax_problem(n, heads, edges, seed), device=DEVICE)
