"""The ``cuda`` backend's aggregate and loss ops (CUDA C++, ``csrc/cuda``) against the reference.

SPEC §7 tolerance against a float64 run of the reference (``ops.common.assert_close_to_float64``):
2x (outputs) / 3x (gradients) the float32 reference's error plus a couple of float32 roundings
of each entry's magnitude. Graphs: hubs above the block-per-row threshold (degree > 512) in
several 256-row chunks, a row of degree exactly 512, isolated nodes, self loops, duplicate edges,
a single node, no edges; f = 1, not a multiple of 8 or 32, 256 (one full tile) and > 256. Also
bitwise determinism and ValueError on bad inputs. Needs a GPU and the built library
(``python fastmetamer/ops/cuda_library.py``); skipped otherwise.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ops.common import (aggregate_magnitudes, assert_close_to_float64, backward_magnitudes, check_edge_softmax,
                        csr_cases, loss_magnitudes, propagate_magnitudes, propagate_problem, random_csr,
                        softmax_problem, transpose_csr)

from fastmetamer.ops import activations, cuda_library
from fastmetamer.ops.aggregate import cuda as agg_cuda
from fastmetamer.ops.aggregate import reference as agg_ref
from fastmetamer.ops.loss import cuda as loss_cuda
from fastmetamer.ops.loss import reference as loss_ref

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_library.available(),
                                 reason="needs a GPU and the built CUDA library (python fastmetamer/ops/cuda_library.py)")]

ACTS = activations.ACTIVATIONS
FAST = settings(deadline=None, max_examples=8, derandomize=True)
# (n, m, f, num_edges, seed) from tests/ops/test_cpu_ops.py: a single node (with and without its
# self loop), no edges, a small hub-heavy graph
SINGLE_NODE, SINGLE_LOOP, NO_EDGES, HUBS = (1, 1, 3, 0, 0), (1, 1, 9, 1, 1), (6, 4, 5, 0, 2), (30, 30, 17, 95, 3)
# random_csr rows 0 (and, with n = 3, row 1) above 512 entries: the block-per-row path
BIG_HUB, TWO_HUBS = (40, 50, 37, 4000, 4), (3, 200, 300, 3000, 5)
RANDOM_CASES = [SINGLE_NODE, SINGLE_LOOP, NO_EDGES, HUBS, BIG_HUB, TWO_HUBS, (7, 7, 257, 60, 6), (9, 9, 256, 700, 7)]
HUB_FEATURES = [1, 37, 256, 300]


def dev(t):
    return None if t is None else t.cuda()


def _d(t):
    return None if t is None else t.double()


def hub_csr(seed: int, n: int = 1000, m: int = 1000):
    """A CSR [n, m] with hub rows 0, 257, 511 and n - 1 (degrees 513, 600, 2000, 520: the block
    path, in three 256-row chunks; 300 duplicates of one column in row 511), row 512 of degree
    exactly 512 (the warp path's largest), every 7th row empty, self loops, light rows of degree
    up to 12. Column 5 is a hub of the transpose. Weights scale as 1 / sqrt(degree), so that
    pre-activations stay O(1) (no underflowing exp / erf tails)."""
    gen = torch.Generator().manual_seed(seed)
    degree = torch.randint(0, 13, (n,), generator=gen)
    degree[::7] = 0
    for row, d in ((0, 513), (257, 600), (511, 2000), (n - 1, 520), (512, 512)):
        degree[row] = d
    rowptr = torch.zeros(n + 1, dtype=torch.long)
    rowptr[1:] = degree.cumsum(0)
    num_edges = int(rowptr[-1])
    col = torch.randint(0, m, (num_edges,), generator=gen)
    rows = torch.repeat_interleave(torch.arange(n), degree)
    loops = (torch.rand(num_edges, generator=gen) < 0.02) & (rows < m)
    col[loops] = rows[loops]
    col[int(rowptr[511]):int(rowptr[511]) + 300] = 5
    return rowptr, col, (torch.rand(num_edges, generator=gen) + 0.1) / degree[rows].sqrt()


def _features(n, m, f, seed, extras, rowptr=None):
    """(x [m, f], bias, residual, grad_out [n, f]); x scaled by 1 / sqrt(max degree of ``rowptr``)
    so that a random_csr hub's pre-activations stay moderate."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, f, generator=gen)
    if rowptr is not None and rowptr.numel() > 1:
        x = x / max(1, int(rowptr.diff().max())) ** 0.5
    bias = torch.randn(f, generator=gen) if extras else None
    residual = torch.randn(n, f, generator=gen) if extras else None
    return x, bias, residual, torch.randn(n, f, generator=gen)


def _saved_from(pre64, act):
    """The float32 saved state of a forward whose pre-activation is ``pre64`` (so the backward
    ops of every backend see the same act')."""
    if act == "relu":
        return activations.pack_bits(pre64 > 0)
    return activations.save_for_backward(pre64.float(), act)


# ----------------------------------------------------------------------------- aggregate
def check_aggregate(rowptr, col, weight, x, bias, residual, grad_out, act):
    """Forward (out, saved), backward over the transpose and edge_grad against float64."""
    n, (m, f) = rowptr.numel() - 1, x.shape
    out, saved = agg_cuda.aggregate_forward(dev(rowptr), dev(col), dev(weight), dev(x), dev(bias), act, dev(residual))
    out32, saved32 = agg_ref.aggregate_forward(rowptr, col, weight, x, bias, act, residual)
    out64, saved64 = agg_ref.aggregate_forward(rowptr, col, weight.double(), x.double(), _d(bias), act, _d(residual))
    assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == (n, f)
    pre_mag, out_mag = aggregate_magnitudes(rowptr, col, weight, x, bias, act, residual)
    assert_close_to_float64(out.cpu(), out32, out64, 2, out_mag, name=f"aggregate_forward[{act}]")
    pre64 = agg_ref.spmm(rowptr, col, weight.double(), x.double()) + (0 if bias is None else bias.double())
    if act == "none":
        assert saved.numel() == 0
    elif act == "relu":
        assert saved.dtype == torch.uint8 and saved.shape == (n, -(-f // 8))
        decided = pre64.abs() > 1e-5  # away from 0 the sign cannot depend on rounding
        assert torch.equal(activations.unpack_bits(saved.cpu(), f)[decided], (pre64 > 0)[decided])
        padding = activations.unpack_bits(saved.cpu(), -(-f // 8) * 8)[:, f:]
        assert not padding.any(), "padding bits of a row's last byte must stay 0"
    else:
        assert saved.dtype == torch.float32 and saved.shape == (n, f)
        assert_close_to_float64(saved.cpu(), saved32, saved64, 2, pre_mag, name=f"saved pre [{act}]")

    t_rowptr, t_col, t_weight = transpose_csr(rowptr, col, weight, m)
    fed = _saved_from(pre64, act)
    fed64 = fed if act == "relu" else activations.save_for_backward(pre64, act)
    gx_mag, gw_mag = backward_magnitudes(rowptr, col, weight, x, grad_out, pre64, act, t_rowptr, t_col, t_weight)
    gx = agg_cuda.aggregate_backward(dev(t_rowptr), dev(t_col), dev(t_weight), dev(grad_out), dev(fed), act)
    gx32 = agg_ref.aggregate_backward(t_rowptr, t_col, t_weight, grad_out, fed, act)
    gx64 = agg_ref.aggregate_backward(t_rowptr, t_col, t_weight.double(), grad_out.double(), fed64, act)
    assert gx.shape == (m, f)
    assert_close_to_float64(gx.cpu(), gx32, gx64, 3, gx_mag, name=f"aggregate_backward[{act}]")

    gw = agg_cuda.edge_grad(dev(rowptr), dev(col), dev(grad_out), dev(fed), act, dev(x))
    gw32 = agg_ref.edge_grad(rowptr, col, grad_out, fed, act, x)
    gw64 = agg_ref.edge_grad(rowptr, col, grad_out.double(), fed64, act, x.double())
    assert gw.shape == col.shape
    assert_close_to_float64(gw.cpu(), gw32, gw64, 3, gw_mag, name=f"edge_grad[{act}]")


@pytest.mark.parametrize("act", ACTS)
@FAST
@given(case=csr_cases(max_features=40), extras=st.booleans())
@example(case=SINGLE_NODE, extras=False)
@example(case=SINGLE_LOOP, extras=True)
@example(case=NO_EDGES, extras=True)
@example(case=HUBS, extras=True)
def test_aggregate_random(act, case, extras):
    n, m, f, num_edges, seed = case
    csr = random_csr(n, m, num_edges, seed)
    check_aggregate(*csr, *_features(n, m, f, seed, extras, csr[0]), act)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", RANDOM_CASES, ids=lambda c: "n{}-m{}-f{}-e{}".format(*c[:4]))
def test_aggregate_cases(case, act):
    n, m, f, num_edges, seed = case
    csr = random_csr(n, m, num_edges, seed)
    check_aggregate(*csr, *_features(n, m, f, seed, seed % 2 == 0, csr[0]), act)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("f", HUB_FEATURES)
def test_aggregate_hubs(f, act):
    rowptr, col, weight = hub_csr(f, n=1000, m=900)
    check_aggregate(rowptr, col, weight, *_features(1000, 900, f, f, f != 256), act)


# ----------------------------------------------------------------------------- propagate
def check_propagate(args, act, skip_loops):
    n, f = args[0].numel() - 1, args[2].shape[1]
    out = agg_cuda.propagate_forward(*[dev(a) for a in args], act=act, skip_loops=skip_loops)
    out32 = agg_ref.propagate_forward(*args, act=act, skip_loops=skip_loops)
    out64 = agg_ref.propagate_forward(*[a if a is None or not a.is_floating_point() else a.double() for a in args],
                                      act=act, skip_loops=skip_loops)
    assert out.shape == (n, f) and out.dtype == torch.float32
    assert_close_to_float64(out.cpu(), out32, out64, 2, propagate_magnitudes(agg_ref, args, act, skip_loops),
                            name=f"propagate_forward[{act}]")


@pytest.mark.parametrize("act", ACTS)
@FAST
@given(case=csr_cases(max_features=40), extras=st.booleans(), skip_loops=st.booleans())
@example(case=SINGLE_LOOP, extras=True, skip_loops=True)
@example(case=NO_EDGES, extras=True, skip_loops=False)
@example(case=SINGLE_NODE, extras=False, skip_loops=True)
@example(case=(40, 40, 33, 4000, 4), extras=True, skip_loops=True)
def test_propagate_forward(act, case, extras, skip_loops):
    n, _, f, num_edges, seed = case
    check_propagate(propagate_problem(n, f, num_edges, seed, extras), act, skip_loops)


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("f", HUB_FEATURES)
def test_propagate_forward_hubs(f, act):
    rowptr, col, _ = hub_csr(f)
    gen = torch.Generator().manual_seed(f)
    scale = torch.rand(1000, generator=gen) + 0.1
    args = (rowptr, col, torch.randn(1000, f, generator=gen), scale, torch.randn(1000, f, generator=gen),
            scale.flip(0), torch.randn(f, generator=gen))
    for skip_loops in (False, True):
        check_propagate(args, act, skip_loops)
        check_propagate((rowptr, col, args[2], None, None, None, None), act, skip_loops)


def test_propagate_forward_skips_only_self_loops():
    """Row 0 reads itself twice and node 1 once: skip_loops drops the first two entries alone."""
    rowptr, col, x = dev(torch.tensor([0, 3, 3])), dev(torch.tensor([0, 0, 1])), dev(torch.tensor([[1.0], [10.0]]))
    assert agg_cuda.propagate_forward(rowptr, col, x, skip_loops=True)[:, 0].tolist() == [10.0, 0.0]
    assert agg_cuda.propagate_forward(rowptr, col, x)[:, 0].tolist() == [12.0, 0.0]


# ----------------------------------------------------------------------------- tangents
def check_tangents(rowptr, col, weight, x):
    P, m, f = x.shape
    out = agg_cuda.aggregate_tangents(dev(rowptr), dev(col), dev(weight), dev(x))
    assert out.shape == (P, rowptr.numel() - 1, f) and out.is_contiguous()
    out32 = agg_ref.aggregate_tangents(rowptr, col, weight, x)
    out64 = agg_ref.aggregate_tangents(rowptr, col, weight.double(), x.double())
    magnitude = agg_ref.aggregate_tangents(rowptr, col, weight.double().abs(), x.double().abs())
    assert_close_to_float64(out.cpu(), out32, out64, 2, magnitude, name="aggregate_tangents")
    for p in range(P):  # the same sums in the same order as the forward on one tangent
        forward, _ = agg_cuda.aggregate_forward(dev(rowptr), dev(col), dev(weight), dev(x[p].contiguous()))
        assert torch.equal(out[p], forward), f"tangent {p} differs from the forward on x[{p}]"


@FAST
@given(case=csr_cases(max_features=40), tangents=st.integers(1, 9))
@example(case=SINGLE_NODE, tangents=1)
@example(case=NO_EDGES, tangents=3)
@example(case=SINGLE_LOOP, tangents=40)
@example(case=BIG_HUB, tangents=7)
def test_aggregate_tangents(case, tangents):
    n, m, f, num_edges, seed = case
    x = torch.randn(tangents, m, f, generator=torch.Generator().manual_seed(seed + 3))
    check_tangents(*random_csr(n, m, num_edges, seed), x)


@pytest.mark.parametrize("tangents,f", [(1, 300), (5, 51), (64, 4)])
def test_aggregate_tangents_hubs(tangents, f):
    """P f above one tile (256 pairs), tiles that straddle tangents, hub rows."""
    rowptr, col, weight = hub_csr(tangents, n=1000, m=700)
    check_tangents(rowptr, col, weight, torch.randn(tangents, 700, f, generator=torch.Generator().manual_seed(f)))


# ----------------------------------------------------------------------------- loss
def check_matched_loss(rowptr, col, weight, x, bias, act, num_comp, seed):
    T, f = rowptr.numel() - 1, x.shape[1]
    gen = torch.Generator().manual_seed(seed + 7)
    target = torch.randn(T, f, generator=gen)
    component = torch.randint(0, num_comp, (T,), generator=gen)  # unsorted; a component may be empty
    scale = torch.rand(num_comp, generator=gen) * 5 + 0.5
    loss, grad_pre = loss_cuda.matched_loss(dev(rowptr), dev(col), dev(weight), dev(x), dev(target), dev(component),
                                            dev(scale), dev(bias), act)
    loss32, grad32 = loss_ref.matched_loss(rowptr, col, weight, x, target, component, scale, bias, act)
    loss64, grad64 = loss_ref.matched_loss(rowptr, col, weight.double(), x.double(), target.double(), component,
                                           scale.double(), _d(bias), act)
    assert loss.shape == (num_comp,) and grad_pre.shape == (T, f) and loss.device.type == "cuda"
    loss_mag, grad_mag = loss_magnitudes(rowptr, col, weight, x, target, component, scale, bias, act)
    assert_close_to_float64(loss.cpu(), loss32, loss64, 2, loss_mag, name=f"matched_loss[{act}]")
    assert_close_to_float64(grad_pre.cpu(), grad32, grad64, 3, grad_mag, name=f"matched_loss grad_pre[{act}]")


@pytest.mark.parametrize("act", ACTS)
@FAST
@given(case=csr_cases(max_features=40), with_bias=st.booleans(), num_comp=st.integers(1, 4))
@example(case=SINGLE_NODE, with_bias=False, num_comp=1)
@example(case=SINGLE_LOOP, with_bias=True, num_comp=1)
@example(case=NO_EDGES, with_bias=False, num_comp=3)
@example(case=TWO_HUBS, with_bias=True, num_comp=2)
def test_matched_loss_random(act, case, with_bias, num_comp):
    T, m, f, num_edges, seed = case
    csr = random_csr(T, m, num_edges, seed)
    x, bias, _, _ = _features(T, m, f, seed, with_bias, csr[0])
    check_matched_loss(*csr, x, bias, act, num_comp, seed)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("f", HUB_FEATURES)
def test_matched_loss_hubs(f, act):
    rowptr, col, weight = hub_csr(f, n=1000, m=600)
    x, bias, _, _ = _features(1000, 600, f, f, True)
    check_matched_loss(rowptr, col, weight, x, bias, act, 5, f)
    check_matched_loss(rowptr, col, weight, x, None, act, 1, f)  # one component of 1000 rows


# ----------------------------------------------------------------------------- determinism
def test_bitwise_deterministic():
    """Every op run twice on a hub graph gives bit-identical results (no atomics)."""
    rowptr, col, weight = (dev(t) for t in hub_csr(11))
    n = rowptr.numel() - 1
    x, bias, residual, grad_out = (dev(t) for t in _features(n, n, 70, 11, True))
    t_rowptr, t_col, t_weight = (dev(t) for t in transpose_csr(*hub_csr(11), n))
    component, target, scale = dev(torch.arange(n) % 3), dev(torch.randn(n, 70)), dev(torch.rand(3) + 1)
    tangents = dev(torch.randn(6, n, 70))

    def run():
        results = []
        for act in ("relu", "gelu"):
            out, saved = agg_cuda.aggregate_forward(rowptr, col, weight, x, bias, act, residual)
            results += [out, saved, agg_cuda.aggregate_backward(t_rowptr, t_col, t_weight, grad_out, saved, act),
                        agg_cuda.edge_grad(rowptr, col, grad_out, saved, act, x),
                        *loss_cuda.matched_loss(rowptr, col, weight, x, target, component, scale, bias, act)]
        results.append(agg_cuda.propagate_forward(rowptr, col, x, scale[component], x, None, bias, "tanh", True))
        results.append(agg_cuda.aggregate_tangents(rowptr, col, weight, tangents))
        return results

    first, again = run(), run()
    for i, (a, b) in enumerate(zip(first, again)):
        assert torch.equal(a, b), f"result {i} differs between two runs"


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_value_error():
    rowptr, col, weight = random_csr(5, 5, 12, 0)
    x = torch.randn(5, 3)
    g_rowptr, g_col, g_weight, g_x = dev(rowptr), dev(col), dev(weight), dev(x)
    t = tuple(dev(a) for a in transpose_csr(rowptr, col, weight, 5))
    target, component, scale = dev(torch.randn(5, 3)), dev(torch.zeros(5, dtype=torch.long)), dev(torch.ones(2))
    bad_calls = [
        lambda: agg_cuda.aggregate_forward(rowptr, col, weight, x),                             # CPU tensors
        lambda: agg_cuda.aggregate_forward(g_rowptr, g_col, g_weight, x),                       # x on the CPU
        lambda: agg_cuda.aggregate_forward(g_rowptr, g_col, g_weight, g_x, torch.randn(3)),     # bias on the CPU
        lambda: agg_cuda.aggregate_forward(g_rowptr, g_col, g_weight, g_x.double()),            # dtype
        lambda: agg_cuda.aggregate_forward(g_rowptr.int(), g_col, g_weight, g_x),               # index dtype
        lambda: agg_cuda.aggregate_forward(g_rowptr, g_col, g_weight[:-1], g_x),                # E mismatch
        lambda: agg_cuda.aggregate_forward(g_rowptr, g_col, g_weight, dev(torch.randn(3, 5)).t()),  # non-contiguous
        lambda: agg_cuda.aggregate_forward(g_rowptr, g_col, g_weight, g_x, act="swish"),        # activation
        lambda: agg_cuda.aggregate_forward(g_rowptr, g_col, g_weight, g_x[:2]),                 # col out of range
        lambda: agg_cuda.aggregate_forward(g_rowptr, g_col - 7, g_weight, g_x),                 # negative col
        lambda: agg_cuda.aggregate_forward(torch.cat([g_rowptr[:-1], g_rowptr[-1:] + 1]), g_col, g_weight, g_x),
        lambda: agg_cuda.aggregate_forward(g_rowptr.flip(0), g_col, g_weight, g_x),             # not monotone
        lambda: agg_cuda.aggregate_forward(g_rowptr, g_col, g_weight, g_x, None, "relu", dev(torch.randn(4, 3))),
        lambda: agg_cuda.aggregate_backward(*t, dev(torch.randn(5, 3)), dev(torch.zeros(5, 2, dtype=torch.uint8)),
                                            "relu"),                                            # bits shape
        lambda: agg_cuda.aggregate_backward(*t, dev(torch.randn(5, 3)), torch.randn(5, 3), "tanh"),  # saved on CPU
        lambda: agg_cuda.aggregate_backward(*t, dev(torch.randn(1, 3)), torch.empty(0), "none"),  # dst ids >= 1
        lambda: agg_cuda.edge_grad(g_rowptr, g_col, dev(torch.randn(5, 4)), dev(torch.empty(0)), "none", g_x),
        lambda: agg_cuda.propagate_forward(g_rowptr, g_col, g_x, row_scale=dev(torch.ones(4))),  # scale length
        lambda: agg_cuda.propagate_forward(g_rowptr, g_col, g_x, self_scale=dev(torch.ones(5))),  # no self_x
        lambda: agg_cuda.propagate_forward(g_rowptr, g_col, g_x[:2]),                           # col out of range
        lambda: agg_cuda.aggregate_tangents(g_rowptr, g_col, g_weight, g_x),                    # x not [P, m, f]
        lambda: agg_cuda.aggregate_tangents(g_rowptr, g_col, g_weight, dev(torch.randn(2, 2, 3))),  # col >= m
        lambda: loss_cuda.matched_loss(g_rowptr, g_col, g_weight, g_x, dev(torch.randn(5, 2)), component, scale),
        lambda: loss_cuda.matched_loss(g_rowptr, g_col, g_weight, g_x, target, component + 2, scale),  # comp >= C
        lambda: loss_cuda.matched_loss(g_rowptr, g_col, g_weight, g_x, target, component.float(), scale),
        lambda: loss_cuda.matched_loss(g_rowptr, g_col, g_weight, g_x, target, component, scale.cpu()),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"bad call {i} did not raise")


@pytest.mark.parametrize("n,heads,edges,seed", [(1, 1, 0, 0), (1, 2, 5, 1), (12, 3, 40, 2), (3, 8, 3000, 3),
                                                (300, 1, 900, 4)])
def test_edge_softmax(n, heads, edges, seed):
    """Forward and backward against float64: a single node, zero weights, a row without positive
    weights, a hub of 750 entries, eight heads; bitwise equal on a second run."""
    case = softmax_problem(n, heads, edges, seed)
    check_edge_softmax(agg_cuda, *case, device="cuda")
    rowptr, logits, weight, grad = (t.cuda() for t in case)
    first, second = agg_cuda.edge_softmax(rowptr, logits, weight), agg_cuda.edge_softmax(rowptr, logits, weight)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="weight"):
        agg_cuda.edge_softmax(rowptr, logits, weight[:-1].contiguous())
