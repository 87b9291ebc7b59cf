"""Batched (per-problem, vectorised) activation and feature distances against the per-problem
metrics applied to every problem in turn."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastmetamer.analysis import activation_distances, feature_distances
from fastmetamer.analysis.batched import activation_distances_rows, feature_distances_segments


def close(batched: dict, singles: list[dict]) -> None:
    assert set(batched) == set(singles[0])
    for key, values in batched.items():
        expected = torch.tensor([s[key] for s in singles], dtype=torch.float64)
        assert torch.allclose(values, expected, rtol=1e-9, atol=1e-12, equal_nan=True), key


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), d=st.integers(1, 7),
       style=st.sampled_from(["normal", "ties", "zeros", "equal"]))
def test_activation_rows_equal_per_row_metrics(seed, rows, d, style):
    """Ties (average ranks), zero rows (inf / -inf SNR, cosine conventions), constant rows (NaN
    correlations) and identical rows."""
    gen = torch.Generator().manual_seed(seed)
    a, ref = torch.randn(rows, d, generator=gen), torch.randn(rows, d, generator=gen)
    if style == "ties":
        a, ref = a.round(), ref.round()
    elif style == "zeros":
        a[0], ref[-1] = 0.0, 0.0
    elif style == "equal":
        a[0] = ref[0]
    close(activation_distances_rows(a, ref), [activation_distances(a[t:t + 1], ref[t:t + 1]) for t in range(rows)])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), problems=st.integers(1, 5), d=st.integers(1, 6), binary=st.booleans(),
       zero_rows=st.booleans())
def test_feature_segments_equal_per_problem_metrics(seed, problems, d, binary, zero_rows):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 5, (problems,), generator=gen)
    segment = torch.repeat_interleave(torch.arange(problems), sizes)
    segment = segment[torch.randperm(segment.numel(), generator=gen)]  # problems interleaved
    m = segment.numel()
    if binary:
        x, ref = [(torch.rand(m, d, generator=gen) < 0.4).float() for _ in range(2)]
    else:
        x, ref = torch.randn(m, d, generator=gen).round(decimals=1), torch.randn(m, d, generator=gen)
    if zero_rows:
        x[0], ref[0], ref[-1] = 0.0, 0.0, 0.0
    singles = [feature_distances(x[segment == s], ref[segment == s], binary=binary) for s in range(problems)]
    close(feature_distances_segments(x, ref, segment, problems, binary=binary), singles)


def test_feature_segments_need_rows_for_every_problem():
    with pytest.raises(ValueError, match="at least one row"):
        feature_distances_segments(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 0]), 2)
    assert math.isinf(float(feature_distances_segments(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([0]), 1)
                            ["relative_l2"][0]))


@pytest.mark.parametrize("kind", ["features", "structure"])
def test_batched_result_metrics_equal_per_problem_ones(kind):
    """A batched result's metrics equal those of each problem scored alone."""
    import fastmetamer as fm
    from conftest import awkward_graph
    from fastmetamer.metamers.scoring import _component_metrics

    graph = awkward_graph(num_nodes=30, num_features=8, seed=4, binary=True)
    torch.manual_seed(0)
    model = fm.models.GCN(8, 3, hidden=8, depth=2).eval()
    res = fm.generate(model, graph, [2, 5, 29], kind=kind, steps=20, refine_steps=5, progress=False)
    metamer, reference = res.graph, res.reference
    from fastmetamer.engines.passes import full_graph_activations

    acts = fm.graph.layers.layer_output(model, res.layer, metamer.x, metamer.edge_index)[res.center]
    ref_acts = full_graph_activations(model, res.layer, graph)[reference.n_id[res.center]]  # the targets' reference
    valid = torch.as_tensor(res.passed) & ~torch.as_tensor(res.trivial)
    for t in range(3):
        nodes = ((reference.batch == t) & reference.free_mask).nonzero().flatten()
        alone = _component_metrics(metamer, reference, nodes, acts[t:t + 1], ref_acts[t:t + 1], kind, bool(valid[t]))
        for group, values in alone.items():
            for key, value in values.items():
                assert res.metrics[group][key][t] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (group, key)
