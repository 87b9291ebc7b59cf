"""Shared helpers for op tests: awkward random CSR graphs and the float64-relative tolerance."""
from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import Tensor


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


def assert_close_to_float64(fast: Tensor, ref32: Tensor, ref64: Tensor, factor: float,
                            floor: float = 1e-5, name: str = "") -> None:
    """SPEC §7 tolerance: |fast - ref64| <= factor * |ref32 - ref64| + floor * (1 + |ref64|),
    elementwise (factor 2 for outputs, 3 for gradients)."""
    fast, ref32 = fast.double(), ref32.double()
    allowed = factor * (ref32 - ref64).abs() + floor * (1 + ref64.abs())
    excess = (fast - ref64).abs() - allowed
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    assert (excess <= 0).all(), f"{name}: max error beyond tolerance {float(excess.max()):.3e}"
