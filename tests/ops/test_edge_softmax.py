"""The edge softmax (attention coefficients of GAT-type layers) of the cpu backend against the
float64 reference, and the reference against autograd through the zoo's ``weighted_softmax``."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ops.common import check_edge_softmax, softmax_problem

from fastmetamer.models.convs import weighted_softmax
from fastmetamer.ops import dispatch
from fastmetamer.ops.aggregate import reference as agg_ref

FAST = settings(deadline=None, max_examples=15, derandomize=True)
needs_cpu = pytest.mark.skipif(not dispatch.is_available("cpu"), reason="cpu backend not built")


@FAST
@given(n=st.integers(1, 30), heads=st.integers(1, 5), edges=st.sampled_from([0, 1, 7, 90]), seed=st.integers(0, 999))
@example(n=1, heads=1, edges=0, seed=0)
@example(n=1, heads=2, edges=5, seed=1)
def test_reference_matches_autograd_of_the_zoo_softmax(n, heads, edges, seed):
    """Forward equal to the zoo's weighted_softmax; gradients equal to autograd through it
    (zero weights, a row without positive weights, hubs, empty rows)."""
    rowptr, logits, weight, grad = (t.double() if t.is_floating_point() else t for t in softmax_problem(n, heads, edges, seed))
    rows = torch.repeat_interleave(torch.arange(n), rowptr.diff())
    logits.requires_grad_()
    weight.requires_grad_()
    want = weighted_softmax(logits, weight, rows, n)
    want_grads = torch.autograd.grad((want * grad).sum(), (logits, weight)) if want.numel() else (logits, weight)
    alpha, beta = agg_ref.edge_softmax(rowptr, logits.detach(), weight.detach())
    torch.testing.assert_close(alpha, want.detach(), rtol=1e-12, atol=0)
    if want.numel():
        got = agg_ref.edge_softmax_backward(rowptr, alpha, beta, grad)
        for g, w in zip(got, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@needs_cpu
@FAST
@given(n=st.integers(1, 40), heads=st.integers(1, 6), edges=st.sampled_from([0, 1, 40, 300]), seed=st.integers(0, 999))
@example(n=3, heads=8, edges=2000, seed=2)  # a hub of 500 entries, eight heads
def test_cpu_edge_softmax_matches_float64(n, heads, edges, seed):
    from fastmetamer.ops.aggregate import cpu

    check_edge_softmax(cpu, *softmax_problem(n, heads, edges, seed))


@needs_cpu
def test_cpu_edge_softmax_thread_count_independent():
    from fastmetamer.ops.aggregate import cpu

    rowptr, logits, weight, grad = softmax_problem(3000, 4, 60000, 7)
    runs = []
    for threads in (1, 2, 3):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            alpha, beta = cpu.edge_softmax(rowptr, logits, weight)
            runs.append((alpha, beta, *cpu.edge_softmax_backward(rowptr, alpha, beta, grad)))
        finally:
            torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@needs_cpu
def test_cpu_edge_softmax_rejects_bad_input():
    from fastmetamer.ops.aggregate import cpu

    rowptr, logits, weight, grad = softmax_problem(5, 2, 12, 0)
    with pytest.raises(ValueError, match="weight"):
        cpu.edge_softmax(rowptr, logits, weight[:-1])
    with pytest.raises(ValueError, match="logits"):
        cpu.edge_softmax(rowptr, logits.double(), weight)
    with pytest.raises(ValueError, match="rowptr"):
        cpu.edge_softmax(rowptr.flip(0).contiguous(), logits, weight)
    with pytest.raises(ValueError, match="non-decreasing"):
        bad = rowptr.clone()
        bad[1], bad[2] = logits.shape[0], 0  # up to the end, then back to 0
        cpu.edge_softmax(bad, logits, weight)
    alpha, beta = cpu.edge_softmax(rowptr, logits, weight)
    with pytest.raises(ValueError, match="grad_alpha"):
        cpu.edge_softmax_backward(rowptr, alpha, beta, grad[:, :1].contiguous())
