"""Shared helpers for op tests: awkward random CSR graphs and the float64-relative tolerance."""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from torch import Tensor

from fastmetamer.ops import activations
from fastmetamer.ops.update.reference import mask_to_csr


def random_csr(n: int, m: int, num_edges: int, seed: int, hub: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """A random CSR matrix [n, m] (rowptr [n+1], col [E], weight [E]) with duplicate entries, a
    hub row, empty rows and, when n == m, self loops. ``num_edges`` may be 0."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, max(n, 1), (num_edges,), generator=gen)
    cols = torch.randint(0, max(m, 1), (num_edges,), generator=gen)
    if hub and n > 0 and m > 0 and num_edges > 4:
        rows[: num_edges // 4] = 0          # row 0 is a hub
        cols[1] = cols[0]                   # a duplicate entry
        if n == m:
            cols[2] = rows[2]               # a self loop
    if n > 2 and num_edges:
        keep = rows != n - 1                # the last row stays empty (an isolated node)
        rows, cols = rows[keep], cols[keep]
    order = torch.argsort(rows, stable=True)
    rows, cols = rows[order], cols[order]
    rowptr = torch.zeros(n + 1, dtype=torch.long)
    rowptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    weight = torch.rand(cols.numel(), generator=gen) + 0.1
    return rowptr, cols, weight


def transpose_csr(rowptr: Tensor, col: Tensor, weight: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR of the transpose [m, n]."""
    rows = torch.repeat_interleave(torch.arange(rowptr.numel() - 1), rowptr.diff())
    order = torch.argsort(col, stable=True)
    t_rowptr = torch.zeros(m + 1, dtype=torch.long)
    t_rowptr[1:] = torch.bincount(col, minlength=m).cumsum(0)
    return t_rowptr, rows[order], weight[order]


@st.composite
def csr_cases(draw, max_nodes: int = 40, max_features: int = 19):
    """(n, m, f, num_edges, seed): sizes including a single node and no edges."""
    n = draw(st.integers(1, max_nodes))
    square = draw(st.booleans())
    m = n if square else draw(st.integers(1, max_nodes))
    f = draw(st.integers(1, max_features))
    num_edges = draw(st.sampled_from([0, 1, n, 3 * n + 5]))
    return n, m, f, num_edges, draw(st.integers(0, 2**31 - 1))


EPS32 = torch.finfo(torch.float32).eps  # 2**-23: one float32 rounding is at most EPS32 / 2 relative
FLOOR_ULPS = 2.0  # the floor: FLOOR_ULPS * EPS32 * magnitude (see assert_close_to_float64)


def assert_close_to_float64(fast: Tensor, ref32: Tensor, ref64: Tensor, factor: float, magnitude: Tensor | float,
                            name: str = "", ulps: float = FLOOR_ULPS) -> None:
    """SPEC §7 tolerance, elementwise: |fast - ref64| <= factor * |ref32 - ref64| + floor
    (factor 2 for outputs, 3 for gradients).

    The floor is ``ulps * EPS32 * magnitude``: a couple of float32 roundings of the magnitude of
    what the entry is computed from (``magnitude``, float64, broadcastable to ``ref64``: e.g.
    |A|.|x| for an aggregation, from the helpers below), i.e. the a-priori size of the float32
    error itself, never a fixed tolerance above it (the old floor 1e-5 * (1 + |ref|) allowed ~100
    roundings). It is needed where the fast kernel rounds differently from the reference (another
    summation order, FMA, its own elementary functions) on an entry where the reference happens
    to round luckily; an error more than a couple of roundings beyond 2x / 3x the float32
    reference's fails."""
    fast, ref32 = fast.double(), ref32.double()
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    magnitude = torch.as_tensor(magnitude, dtype=torch.float64)
    assert (magnitude >= 0).all(), f"{name}: magnitude must be >= 0"
    allowed = factor * (ref32 - ref64).abs() + ulps * EPS32 * magnitude
    excess = (fast - ref64).abs() - allowed
    assert (excess <= 0).all(), (
        f"{name}: max error beyond tolerance {float(excess.max()):.3e} "
        f"(error {float((fast - ref64).abs().flatten()[excess.argmax()]):.3e}, "
        f"float32 reference error {float((ref32 - ref64).abs().flatten()[excess.argmax()]):.3e})")


# ------------------------------------------------------------------ magnitudes (float64)
# Each is the first-order size of the rounding errors an entry collects, in units of EPS32: the
# sum of the absolute values of the terms and intermediate results it is computed from,
# weighted by how much the entry depends on them (so cancellation in a sum does not shrink it,
# and an ill-conditioned step such as 1 - P for P near 1 enlarges it).

def check_thresholds_and_csr(hard: Tensor, thr: Tensor, ptr: Tensor, csr: tuple, thr32: Tensor, thr64: Tensor,
                             name: str) -> None:
    """The shared tail of every backend's top_mask check (all on the CPU): the thresholds of the
    rows inside the blocks, ``(P_(k) + P_(k+1)) / 2`` or an extreme P -/+ 1e-6, within a few
    roundings of the float64 reference's, and the CSR form ``csr`` = (rowptr, col, threshold)
    holding exactly the ones of ``hard`` (same tie breaking) and the same thresholds."""
    covered = torch.zeros(thr.shape[0], dtype=torch.bool)
    covered[int(ptr[0]):int(ptr[-1])] = True
    if hard.shape[1]:
        assert_close_to_float64(thr[covered], thr32[covered], thr64[covered], 2, thr64[covered].abs(),
                                name=f"threshold {name}")
    rowptr, col, thr_csr = csr
    want_rowptr, want_col = mask_to_csr(hard)
    assert torch.equal(rowptr, want_rowptr) and torch.equal(col, want_col), f"csr {name}"
    assert torch.equal(thr_csr, thr), f"csr threshold {name}"


def spmm_abs(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """|A| @ |x| [n, f] in float64: the magnitude of every sum of an aggregation."""
    rows = torch.repeat_interleave(torch.arange(rowptr.numel() - 1), rowptr.diff())
    out = torch.zeros(rowptr.numel() - 1, x.shape[1], dtype=torch.float64)
    return out.index_add_(0, rows, weight.double().abs().unsqueeze(1) * x.double().abs()[col])


def activation_magnitudes(pre: Tensor, act: str) -> tuple[Tensor, Tensor, Tensor]:
    """(|act'(pre)|, value magnitude, derivative magnitude) [n, f] in float64 at ``pre``.

    value: the size of the roundings made computing act(pre) from an exact pre; derivative: the
    same for computing act'(pre) (e.g. 1 - tanh^2 of a rounded tanh carries its error twice)."""
    pre = pre.double()
    slope = activations.derivative(pre, act).abs()
    value = activations.apply(pre, act).abs()
    if act in ("none", "relu"):
        return slope, torch.zeros_like(pre), torch.zeros_like(pre)
    if act == "leaky_relu":
        return slope, value, torch.zeros_like(pre)
    if act == "elu":
        return slope, value, torch.where(pre > 0, 0.0, slope)
    if act == "tanh":
        t2 = torch.tanh(pre) ** 2
        return slope, value, 1 + t2
    # gelu = x Phi(x), Phi = (1 + erf(x / sqrt 2)) / 2: the sum 1 + erf rounds at the size of 1
    density = torch.exp(-0.5 * pre * pre) / math.sqrt(2 * math.pi)
    return slope, pre.abs() * 1.5 + value, 1 + pre.abs() * density


def aggregate_magnitudes(rowptr, col, weight, x, bias, act, residual) -> tuple[Tensor, Tensor]:
    """(magnitude of pre = A x + bias, magnitude of out = act(pre) + residual) [n, f]."""
    pre_mag = spmm_abs(rowptr, col, weight, x)
    pre = _spmm64(rowptr, col, weight, x)
    if bias is not None:
        pre_mag = pre_mag + bias.double().abs()
        pre = pre + bias.double()
    slope, value, _ = activation_magnitudes(pre, act)
    out_mag = slope * pre_mag + value
    if residual is not None:
        out_mag = out_mag + residual.double().abs() + value
    return pre_mag, out_mag


def backward_magnitudes(rowptr, col, weight, x, grad_out, pre64, act, t_rowptr, t_col, t_weight) -> tuple[Tensor, Tensor]:
    """(magnitude of grad_x = A^T (grad_out * act'(pre)) [m, f], of the edge gradient [E])."""
    slope, _, deriv = activation_magnitudes(pre64, act)
    grad_pre_mag = grad_out.double().abs() * (slope + deriv)
    grad_x_mag = spmm_abs(t_rowptr, t_col, t_weight, grad_pre_mag)
    rows = torch.repeat_interleave(torch.arange(rowptr.numel() - 1), rowptr.diff())
    edge_mag = (grad_pre_mag[rows] * x.double().abs()[col]).sum(1)
    return grad_x_mag, edge_mag


def loss_magnitudes(rowptr, col, weight, x, target, component, scale, bias, act) -> tuple[Tensor, Tensor]:
    """(magnitude of loss [C] = sum over c's rows of ||act(A x + b) - target||^2 / scale[c], of
    grad_pre = 2 (h - target) act'(pre) / scale [T, f]; grad_pre also moves with pre's own rounding
    through act'', the curvature term)."""
    pre_mag, h_mag = aggregate_magnitudes(rowptr, col, weight, x, bias, act, None)
    pre = _spmm64(rowptr, col, weight, x) + (0 if bias is None else bias.double())
    slope, _, deriv = activation_magnitudes(pre, act)
    diff = (activations.apply(pre, act) - target.double()).abs()
    diff_mag = h_mag + diff                                  # h's error and the subtraction's
    inv = 1 / scale.double().abs()[component].unsqueeze(1)
    per_row = ((2 * diff * diff_mag + diff * diff) * inv).sum(1)
    loss_mag = torch.zeros(scale.numel(), dtype=torch.float64).index_add_(0, component, per_row)
    grad_mag = 2 * (diff_mag * slope + diff * deriv + diff * slope + diff * _curvature(pre, act) * pre_mag) * inv
    return loss_mag, grad_mag


def _curvature(pre: Tensor, act: str) -> Tensor:
    """|act''(pre)| [n, f] in float64 (0 for the piecewise-linear activations)."""
    if act in ("none", "relu", "leaky_relu"):
        return torch.zeros_like(pre)
    pre = pre.detach().double().requires_grad_(True)
    return torch.autograd.grad(activations.derivative(pre, act).sum(), pre)[0].abs()


class AdamMagnitudes:
    """Running magnitudes of theta, exp_avg and exp_avg_sq through steps of the reference
    ``adam_ste_update`` (evaluated in float64 beside the float64 reference run)."""

    def __init__(self, theta: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor):
        self.theta, self.m, self.v = theta.double().abs(), exp_avg.double().abs(), exp_avg_sq.double().abs()

    def step(self, theta, grad_x, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, slope, threshold,
             margin, margin_scale, active, bound=None, grad_mag=None) -> None:
        """Advance by one step from the float64 state *before* the step (the arguments);
        ``grad_mag``: the magnitude ``grad_x`` is computed from (default |grad_x|; for a product
        G @ W^T, |G| @ |W|^T)."""
        s = abs(slope)
        p = torch.sigmoid(slope * theta.double())
        gap = p - threshold.double().unsqueeze(1)
        near = (gap.abs() < margin).double()
        ms = margin_scale.double().abs().unsqueeze(1)
        grad_p = grad_x.double() - ms * torch.sign(gap) * near
        grad_p_mag = (grad_x.double().abs() if grad_mag is None else grad_mag.double()) + ms * near
        g = grad_p * slope * p * (1 - p)
        # P = sigmoid(s theta) rounds at the size of P and 1 - P inherits that rounding unscaled,
        # so g = grad_p s P (1 - P) moves by |grad_p| s P per rounding of P (not |g|: the step is
        # ill-conditioned for P near 1); with the three products' roundings (each <= |grad_p| s P):
        g_mag = s * (grad_p_mag * p * (1 - p) + grad_p.abs() * p * 4)
        m_new = beta1 * exp_avg.double() + (1 - beta1) * g
        v_new = beta2 * exp_avg_sq.double() + (1 - beta2) * g * g
        self.m = beta1 * self.m + (1 - beta1) * g_mag + m_new.abs()
        self.v = beta2 * self.v + (1 - beta2) * 2 * g.abs() * g_mag + v_new.abs()
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        root = (v_new / bc2).sqrt()
        den = root + eps
        update = (m_new / bc1) / den
        root_mag = torch.where(root > 0, self.v / bc2 / (2 * root.clamp_min(1e-300)), self.v / bc2) + root
        update_mag = self.m / bc1 / den + (m_new / bc1).abs() * root_mag / den ** 2 + 2 * update.abs()
        moved = active.unsqueeze(1).double()
        new_theta = theta.double() - lr * moved * update
        self.theta = self.theta + moved * (lr * update_mag + new_theta.abs())
        if bound is not None and bound != float("inf"):
            clamped = new_theta.abs() >= bound
            self.theta = torch.where(clamped, torch.full_like(self.theta, bound), self.theta)

    def magnitudes(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.theta, self.m, self.v


def _spmm64(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    rows = torch.repeat_interleave(torch.arange(rowptr.numel() - 1), rowptr.diff())
    out = torch.zeros(rowptr.numel() - 1, x.shape[1], dtype=torch.float64)
    return out.index_add_(0, rows, weight.double().unsqueeze(1) * x.double()[col])


def propagate_problem(n: int, f: int, num_edges: int, seed: int, extras: bool):
    """Arguments of ``propagate_forward`` on a random square CSR with hubs, duplicates, self loops
    and an isolated node: (rowptr, col, x [n, f], row_scale, self_x, self_scale, bias), the last
    four None unless ``extras``."""
    rowptr, col, _ = random_csr(n, n, num_edges, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(n, f, generator=gen)
    if not extras:
        return rowptr, col, x, None, None, None, None
    scale = torch.rand(n, generator=gen) + 0.1
    return rowptr, col, x, scale, torch.randn(n, f, generator=gen), scale.flip(0), torch.randn(f, generator=gen)


def propagate_magnitudes(reference, args: tuple, act: str, skip_loops: bool) -> Tensor:
    """Magnitude [n, f] of ``propagate_forward``'s output: the reference run on absolute values
    in float64 (|s| sum |x| + |t| |self| + |bias|) through the activation's slope."""
    rowptr, col, *floats = args
    absolute = [None if t is None else t.double().abs() for t in floats]
    pre_mag = reference.propagate_forward(rowptr, col, *absolute, act="none", skip_loops=skip_loops)
    pre64 = reference.propagate_forward(rowptr, col, *[None if t is None else t.double() for t in floats],
                                        act="none", skip_loops=skip_loops)
    slope, value, _ = activation_magnitudes(pre64, act)
    return slope * pre_mag + value


def softmax_problem(n: int, heads: int, num_edges: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rowptr [n+1], logits [E, H], weight [E], grad_alpha [E, H]) float32 for the edge softmax:
    :func:`random_csr`'s rows (a hub, an empty row, duplicates), logits of spread 4, a quarter of
    the weights 0 (entries that take no part) and a row whose weights are all 0."""
    rowptr, _, weight = random_csr(n, n, num_edges, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    entries = weight.numel()
    logits = 4 * torch.randn(entries, heads, generator=gen)
    weight = torch.where(torch.rand(entries, generator=gen) < 0.25, torch.zeros_like(weight), weight)
    if n > 1:
        weight[rowptr[1]:rowptr[2]] = 0.0  # row 1: no entry of positive weight
    return rowptr, logits, weight, torch.randn(entries, heads, generator=gen)


def check_edge_softmax(module, rowptr: Tensor, logits: Tensor, weight: Tensor, grad_alpha: Tensor,
                       device: torch.device | str = "cpu") -> None:
    """``module``'s edge_softmax and its backward against float64 with the SPEC §7 tolerance
    (:func:`assert_close_to_float64`: 2x / 3x the float32 reference's error), with floors from
    the float32 operations each entry sees: the exponent (|l - m| + 2 roundings), the row's
    denominator sum (degree roundings), the division; backward, the row's dot product ((degree
    + 2) roundings of sum |alpha g|) and the weight gradient's sum over heads."""
    from fastmetamer.ops.aggregate import reference as agg_ref

    def run(function, *args):
        return [t.cpu() for t in function(*(a.to(device) for a in args))]

    alpha, beta = run(module.edge_softmax, rowptr, logits, weight)
    ref32 = agg_ref.edge_softmax(rowptr, logits, weight)
    ref64 = agg_ref.edge_softmax(rowptr, logits.double(), weight.double())
    rows = torch.repeat_interleave(torch.arange(rowptr.numel() - 1), rowptr.diff())
    degree = rowptr.diff().double()[rows].unsqueeze(1)
    top = torch.where(weight > 0, logits.double().abs().amax(1), torch.zeros_like(weight.double()))
    row_top = torch.zeros(rowptr.numel() - 1, dtype=torch.float64).scatter_reduce(0, rows, top, "amax")
    exponent = logits.double().abs() + row_top[rows].unsqueeze(1) + degree + 4
    for got, r32, r64, name in zip((alpha, beta), ref32, ref64, ("alpha", "beta")):
        assert_close_to_float64(got, r32, r64, 2, exponent * r64.abs(), name)
    grads = run(module.edge_softmax_backward, rowptr, alpha, beta, grad_alpha)
    ref32 = agg_ref.edge_softmax_backward(rowptr, alpha, beta, grad_alpha)
    a64, b64, g64 = alpha.double(), beta.double(), grad_alpha.double()
    ref64 = agg_ref.edge_softmax_backward(rowptr, a64, b64, g64)
    row_dot = torch.zeros(rowptr.numel() - 1, a64.shape[1], dtype=torch.float64).index_add_(0, rows, (a64 * g64).abs())
    centred = g64.abs() + (degree + 2) * row_dot[rows]
    magnitudes = (a64 * centred, (b64 * centred).sum(1) * (a64.shape[1] + 1))
    for got, r32, r64, size, name in zip(grads, ref32, ref64, magnitudes, ("grad logits", "grad weight")):
        assert_close_to_float64(got, r32, r64, 3, size, name)
