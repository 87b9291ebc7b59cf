"""Tests of fastmetamer.analysis: every metric against values known by hand, plus edge cases."""
from __future__ import annotations

import csv
import io
import math
from collections import Counter

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr, wasserstein_distance

from fastmetamer.analysis import (PairPredictions, activation_distances, activation_loss,
                                  activation_loss_per_row, bootstrap_ci, consistency_scores, cosine,
                                  cosine_per_row, degree_distance, edge_jaccard, feature_cosine,
                                  feature_distances, hamming, jaccard, marginal_distance, pearson,
                                  pivot_matrix, recognisability_matrix, relative_l2, relevant_share,
                                  snr_db, spearman, spectral_distance, structure_distances,
                                  wl_similarity)

T = torch.tensor
NO_EDGES = torch.empty(2, 0, dtype=torch.long)
C4 = T([[0, 1, 2, 3], [1, 2, 3, 0]])
P4 = T([[0, 1, 2], [1, 2, 3]])
K2 = T([[0], [1]])
approx = pytest.approx


# ---------------------------------------------------------------- activation distances

def test_activation_loss_known_value():
    assert activation_loss(T([3.0, 4.0]), T([0.0, 5.0])) == approx(10 / 25)
    assert activation_loss(T([[1.0, 2.0]]), T([[1.0, 2.0]])) == 0.0


def test_activation_loss_zero_reference():
    assert activation_loss(torch.zeros(3), torch.zeros(3)) == 0.0
    assert activation_loss(T([0.0, 1.0, 0.0]), torch.zeros(3)) == math.inf


def test_activation_loss_per_row():
    out = activation_loss_per_row(T([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]),
                                  T([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    assert out.tolist() == approx([0.25, 0.0, math.inf])
    with pytest.raises(ValueError, match="2-D"):
        activation_loss_per_row(torch.ones(3), torch.ones(3))


def test_snr_db_known_perturbation():
    assert snr_db(T([2.0, 0.2]), T([2.0, 0.0])) == approx(20.0)  # noise power 1 % of signal
    assert snr_db(T([1.0, 2.0]), T([1.0, 2.0])) == math.inf
    assert snr_db(T([1.0, 0.0]), torch.zeros(2)) == -math.inf


def test_pearson_known_values():
    a = T([1.0, 2.0, 3.0])
    assert pearson(a, T([2.0, 4.0, 6.0])) == approx(1.0)
    assert pearson(a, T([3.0, 2.0, 1.0])) == approx(-1.0)
    assert pearson(a, T([1.0, 3.0, 2.0])) == approx(0.5)  # (-1,0,1)·(-1,1,0) / (√2·√2)


def test_spearman_known_values_and_scipy():
    assert spearman(T([1.0, 2.0, 3.0, 4.0]), T([1.0, 8.0, 27.0, 64.0])) == approx(1.0)
    assert spearman(T([1.0, 2.0, 3.0]), T([10.0, 30.0, 20.0])) == approx(0.5)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 4, (5, 6), generator=g).float(), torch.randn(5, 6, generator=g)
    assert spearman(a, b) == approx(spearmanr(a.flatten(), b.flatten()).statistic)  # with ties


def test_correlations_of_constant_input_are_nan():
    assert math.isnan(pearson(torch.ones(4), torch.arange(4.0)))
    assert math.isnan(spearman(torch.arange(4.0), torch.full((4,), 2.0)))
    assert math.isnan(pearson(T([1.0]), T([2.0])))


def test_cosine_known_values():
    assert cosine(T([1.0, 0.0]), T([0.0, 3.0])) == approx(0.0, abs=1e-15)
    assert cosine(T([1.0, 1.0]), T([2.0, 2.0])) == approx(1.0)
    assert cosine(T([1.0, 1.0]), T([-1.0, -1.0])) == approx(-1.0)
    assert cosine(T([1.0, 0.0]), T([1.0, 1.0])) == approx(1 / math.sqrt(2))
    assert cosine(torch.zeros(2), torch.zeros(2)) == 1.0
    assert cosine(torch.zeros(2), T([1.0, 0.0])) == 0.0


def test_cosine_per_row():
    out = cosine_per_row(T([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]), T([[0.0, 1.0], [0.0, 0.0], [3.0, 3.0]]))
    assert out.tolist() == approx([0.0, 1.0, 1.0])


def test_activation_distances_keys_and_values():
    ref = T([[2.0, 0.0]])
    out = activation_distances(T([[2.0, 0.2]]), ref)
    assert set(out) == {"act_loss", "snr_db", "pearson", "spearman", "cosine"}
    assert out["act_loss"] == approx(0.01) and out["snr_db"] == approx(20.0)
    assert out["pearson"] == approx(1.0) and out["spearman"] == approx(1.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=2, max_size=8), st.floats(0.01, 1.0))
def test_snr_is_minus_ten_log_of_activation_loss(values, scale):
    ref = T(values, dtype=torch.float64) + 20.0
    a = ref + scale * torch.linspace(-1, 1, len(values), dtype=torch.float64)
    assert snr_db(a, ref) == approx(-10 * math.log10(activation_loss(a, ref)))
    assert -1.0 <= cosine(a, ref) <= 1.0


def test_activation_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        activation_loss(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="empty"):
        cosine(torch.ones(0), torch.ones(0))
    with pytest.raises(ValueError, match="NaN"):
        snr_db(T([math.nan]), T([1.0]))


# ---------------------------------------------------------------- feature distances

def test_feature_cosine_known_and_zero_rows():
    assert feature_cosine(T([[1.0, 0.0], [1.0, 1.0]]), T([[0.0, 1.0], [1.0, 1.0]])) == approx(0.5)
    assert feature_cosine(T([[0.0, 0.0], [1.0, 0.0]]), torch.zeros(2, 2)) == approx(0.5)


def test_relative_l2_known_value():
    assert relative_l2(T([[0.0, 4.0]]), T([[3.0, 4.0]])) == approx(0.6)
    assert relative_l2(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0
    assert relative_l2(torch.ones(2, 2), torch.zeros(2, 2)) == math.inf


def test_jaccard_and_hamming_known_values():
    x, ref = T([[1, 1, 0, 0]]), T([[0, 1, 1, 0]])
    assert jaccard(x, ref) == approx(1 / 3)
    assert hamming(x, ref) == approx(0.5)
    assert jaccard(torch.zeros(2, 3), torch.zeros(2, 3)) == 1.0
    assert hamming(x.bool(), x.bool()) == 0.0
    with pytest.raises(ValueError, match="not binary"):
        jaccard(T([[0.5, 1.0]]), T([[0.0, 1.0]]))


def test_marginal_distance_known_values():
    # x column {0,1,2} vs ref column {0,3}: quantile steps give 1/6·1 + 1/6·2 + 1/3·1 = 5/6.
    assert marginal_distance(T([[0.0], [1.0], [2.0]]), T([[0.0], [3.0]])) == approx(5 / 6)
    # Binary: mean over features of |freq - freq_ref| = (|0.5-1| + |0.25-1|) / 2 = 0.625.
    x = T([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    assert marginal_distance(x, torch.ones(2, 2)) == approx(0.625)
    assert marginal_distance(x + 2.5, x) == approx(2.5)  # a shift by c costs c
    assert marginal_distance(x[[2, 0, 3, 1]], x) == 0.0  # rows permuted: same marginals


def test_marginal_distance_matches_scipy():
    g = torch.Generator().manual_seed(1)
    x, ref = torch.randn(7, 4, generator=g), 2 * torch.rand(5, 4, generator=g)
    expected = sum(wasserstein_distance(x[:, j], ref[:, j]) for j in range(4)) / 4
    assert marginal_distance(x, ref) == approx(expected)
    with pytest.raises(ValueError, match="same number of features"):
        marginal_distance(x, ref[:, :3])


def test_feature_distances_binary_detection():
    x, ref = T([[1.0, 1.0, 0.0, 0.0]]), T([[0.0, 1.0, 1.0, 0.0]])
    out = feature_distances(x, ref)
    assert set(out) == {"cosine", "relative_l2", "marginal_w1", "jaccard", "hamming"}
    assert out["cosine"] == approx(0.5) and out["relative_l2"] == approx(1.0)
    assert out["marginal_w1"] == approx(0.5) and out["jaccard"] == approx(1 / 3)
    assert set(feature_distances(x + 0.5, ref)) == {"cosine", "relative_l2", "marginal_w1"}
    assert "jaccard" not in feature_distances(x, ref, binary=False)
    with pytest.raises(ValueError, match="not binary"):
        feature_distances(x + 0.5, ref, binary=True)


# ---------------------------------------------------------------- structure distances

def _wl_reference(graphs, iterations):
    """Independent normalised WL subtree kernel: labels refined as nested tuples, histograms summed."""
    def features(graph, labels):
        hist = Counter(labels.values())
        for _ in range(iterations):
            labels = {v: (labels[v], tuple(sorted(labels[u] for u in graph[v]))) for v in graph}
            hist.update(labels.values())
        return hist
    (g, lg), (h, lh) = graphs
    fg, fh = features(g, lg), features(h, lh)
    dot = lambda p, q: sum(p[k] * q[k] for k in p)  # noqa: E731
    return dot(fg, fh) / math.sqrt(dot(fg, fg) * dot(fh, fh))


def test_wl_cycle_vs_path_by_hand():
    # Degree labels: C4 = {2:4}, P4 = {1:2, 2:2}. Level 0: <P,C> = 8, <P,P> = 8, <C,C> = 16;
    # refined levels share no labels and add 8 (P) and 16 (C) to the self-kernels each.
    assert wl_similarity(C4, P4, 4, iterations=1) == approx(8 / math.sqrt(16 * 32))
    assert wl_similarity(C4, P4, 4, iterations=3) == approx(8 / math.sqrt(32 * 64))


def test_wl_identical_and_isomorphic_graphs():
    assert wl_similarity(C4, C4, 4) == approx(1.0)
    relabelled = T([[3, 1, 0, 2], [1, 0, 2, 3]])  # the cycle 3-1-0-2-3: C4 relabelled
    assert wl_similarity(relabelled, C4, 4) == approx(1.0)


def test_wl_matches_independent_implementation():
    for seed in range(4):
        g = nx.gnp_random_graph(9, 0.25, seed=seed)
        h = nx.gnp_random_graph(7, 0.35, seed=seed + 10)
        labels = [v % 3 for v in range(9)]
        ref_labels = [v % 2 for v in range(7)]
        ei = T(list(g.edges()), dtype=torch.long).reshape(-1, 2).t()
        ref_ei = T(list(h.edges()), dtype=torch.long).reshape(-1, 2).t()
        expected = _wl_reference([(g, dict(enumerate(labels))), (h, dict(enumerate(ref_labels)))], 2)
        assert wl_similarity(ei, ref_ei, 9, 7, T(labels), T(ref_labels), iterations=2) == approx(expected)
        deg = [(x, dict(x.degree())) for x in (g, h)]
        assert wl_similarity(ei, ref_ei, 9, 7) == approx(_wl_reference(deg, 3))


def test_wl_graphs_without_edges_and_single_nodes():
    assert wl_similarity(NO_EDGES, NO_EDGES, 3) == approx(1.0)
    assert wl_similarity(NO_EDGES, NO_EDGES, 1, 2) == approx(1.0)  # proportional histograms
    assert wl_similarity(NO_EDGES, K2, 1, 2) == 0.0  # degree 0 vs degree 1: no common label
    # Given labels: level 0 <G,H> = 2, <G,G> = 1, <H,H> = 4; level 1 shares nothing, adds 1 and 4.
    assert wl_similarity(NO_EDGES, K2, 1, 2, T([0]), T([0, 0]), iterations=1) == approx(2 / math.sqrt(2 * 8))
    assert wl_similarity(P4, P4, 6) == approx(1.0)  # two isolated nodes


def test_edge_jaccard_known_values():
    assert edge_jaccard(T([[0, 1], [1, 2]]), T([[1, 2], [2, 3]])) == approx(1 / 3)
    messy = T([[0, 1, 1, 2, 2, 1], [1, 0, 2, 1, 2, 1]])  # reversed duplicates and self loops
    assert edge_jaccard(messy, T([[0, 1], [1, 2]])) == 1.0
    assert edge_jaccard(NO_EDGES, NO_EDGES) == 1.0
    assert edge_jaccard(T([[0], [0]]), NO_EDGES) == 1.0  # a self loop alone is no edge
    assert edge_jaccard(K2, NO_EDGES) == 0.0


def test_degree_distance_known_values():
    assert degree_distance(K2, NO_EDGES, 2) == approx(1.0)
    star = T([[0, 0, 0], [1, 2, 3]])  # degrees 3,1,1,1 vs path 1,2,2,1: sorted diffs 0,0,1,1
    assert degree_distance(star, P4, 4) == approx(0.5)
    assert degree_distance(K2, T([[0, 1], [1, 2]]), 2, 3) == approx(1 / 3)  # {1,1} vs {1,1,2}
    assert degree_distance(NO_EDGES, NO_EDGES, 1) == 0.0


def test_spectral_distance_known_values():
    assert spectral_distance(C4, C4, 4) == approx(0.0, abs=1e-12)
    assert spectral_distance(T([[3, 1, 0, 2], [1, 0, 2, 3]]), C4, 4) == approx(0.0, abs=1e-12)
    assert spectral_distance(K2, NO_EDGES, 2) == approx(2.0)  # {0, 2} vs {0, 0}
    # C4: {0, 1, 1, 2}; P4: 1 - cos(πk/3) = {0, 0.5, 1.5, 2}; difference (0, .5, -.5, 0).
    assert spectral_distance(C4, P4, 4) == approx(math.sqrt(0.5))
    assert spectral_distance(K2, K2, 2, 3) == approx(0.0, abs=1e-12)  # padding = isolated node
    assert spectral_distance(NO_EDGES, NO_EDGES, 1) == 0.0
    assert math.isnan(spectral_distance(C4, C4, 4, max_nodes=3))


def test_structure_distances_keys_and_single_node():
    out = structure_distances(NO_EDGES, NO_EDGES, 1)
    assert out == {"wl": approx(1.0), "edge_jaccard": 1.0, "degree_w1": 0.0, "spectral": 0.0}
    out = structure_distances(C4, P4, 4)
    assert out["wl"] == approx(math.sqrt(2) / 8) and out["edge_jaccard"] == approx(0.75)
    assert out["degree_w1"] == approx(0.5) and out["spectral"] == approx(math.sqrt(0.5))


def test_structure_bad_input():
    with pytest.raises(ValueError, match=r"\[2, num_edges\]"):
        edge_jaccard(T([[0, 1, 2]]), NO_EDGES)
    with pytest.raises(TypeError, match="integer dtype"):
        degree_distance(K2.float(), K2, 2)
    with pytest.raises(ValueError, match="node id 3"):
        spectral_distance(P4, P4, 3)
    with pytest.raises(ValueError, match="positive int"):
        wl_similarity(NO_EDGES, NO_EDGES, 0)
    with pytest.raises(ValueError, match="one label per node"):
        wl_similarity(K2, K2, 2, labels=T([0]), ref_labels=T([0, 1]))
    with pytest.raises(ValueError, match="both labels"):
        wl_similarity(K2, K2, 2, labels=T([0, 1]))


# ---------------------------------------------------------------- consistency scores

def test_consistency_scalar_by_hand():
    out = consistency_scores(0.98, s_feat=0.3)
    assert out["s_in"] == approx(0.3) and out["consistency"] == approx(0.32)
    assert out["relevant_share"] == 0.0  # S_match below 0.99
    joint = consistency_scores(1.0, s_feat=0.2, s_struct=0.6, kind="joint")
    assert joint["s_in"] == approx(0.4) and joint["consistency"] == approx(0.4)
    assert joint["relevant_share"] == 1.0
    structure = consistency_scores(0.9, s_struct=0.9, kind="structure")
    assert structure["consistency"] == approx(1.0)


def test_consistency_clipping():
    assert consistency_scores(1.2, s_feat=0.5)["s_match"] == 1.0  # rounding above 1
    assert consistency_scores(-0.5, s_feat=0.2)["consistency"] == approx(0.8)  # S_match -> 0
    assert consistency_scores(1.0, s_feat=-0.4)["consistency"] == approx(0.0)  # S_in -> 0


def test_consistency_per_target_tensors():
    s_match = T([1.0, 0.995, 0.5, 1.0])
    out = consistency_scores(s_match, s_feat=T([0.1, 0.6, 0.1, 0.5]))
    assert out["consistency"].tolist() == approx([0.1, 0.605, 0.6, 0.5])
    assert out["consistency_mean"] == approx(1.805 / 4)
    assert out["relevant_share"] == approx(0.5)  # targets 0 and 3
    assert relevant_share(s_match, T([0.1, 0.6, 0.1, 0.5])) == approx(0.5)
    assert relevant_share(0.995, 0.3, match_min=0.999) == 0.0


def test_consistency_bad_input():
    with pytest.raises(ValueError, match="needs s_feat"):
        consistency_scores(1.0, s_struct=0.5)
    with pytest.raises(ValueError, match="missing s_struct"):
        consistency_scores(1.0, s_feat=0.5, kind="joint")
    with pytest.raises(ValueError, match="kind must be one of"):
        consistency_scores(1.0, s_feat=0.5, kind="edges")
    with pytest.raises(ValueError, match="1-D"):
        consistency_scores(torch.ones(2, 2), s_feat=0.5)
    with pytest.raises(ValueError, match="at least one target"):
        relevant_share(torch.ones(0), torch.ones(0))


# ---------------------------------------------------------------- recognisability

def test_bootstrap_ci_contains_mean_and_shrinks_with_n():
    widths = []
    for n in (20, 2000):
        values = (torch.arange(n) % 2).double()
        mean, low, high = bootstrap_ci(values, n_boot=1000, seed=0)
        assert mean == 0.5 and low <= mean <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 5  # ~1/sqrt(n): factor 10
    # Binomial standard error at n = 2000 is 0.0112, so the 95 % CI is about ±0.022.
    assert 0.035 < widths[1] < 0.055


def test_bootstrap_ci_constant_and_seeded():
    assert bootstrap_ci(torch.full((10,), 0.7)) == approx((0.7, 0.7, 0.7))
    values = torch.rand(50, generator=torch.Generator().manual_seed(3))
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bootstrap_ci(torch.ones(0))
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(torch.ones(3), alpha=1.5)


def test_recognisability_matrix_rows_and_pivot():
    labels = T([0, 1, 2, 0])
    logits = torch.nn.functional.one_hot(labels, 3).float()  # argmax gives the labels
    predictions = {
        ("gcn", "gat"): PairPredictions(T([0, 1, 0, 0]), logits, labels),
        ("gcn", "gcn"): (labels, labels, labels),
        ("gat", "gcn"): (T([1, 0, 0, 1]), labels, labels),
    }
    rows = recognisability_matrix(predictions, n_boot=200, seed=0)
    assert [(r["source"], r["judge"]) for r in rows] == list(predictions)
    assert rows[0]["metamer_acc"] == 0.75 and rows[0]["reference_acc"] == 1.0 and rows[0]["n"] == 4
    assert rows[0]["metamer_ci_low"] <= 0.75 <= rows[0]["metamer_ci_high"]
    assert rows[2]["metamer_acc"] == 0.0
    sources, judges, matrix = pivot_matrix(rows)
    assert sources == ["gcn", "gat"] and judges == ["gat", "gcn"]
    assert matrix[0].tolist() == [0.75, 1.0] and math.isnan(matrix[1, 0]) and matrix[1, 1] == 0.0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    assert len(buffer.getvalue().splitlines()) == 4


def test_recognisability_bad_input():
    with pytest.raises(ValueError, match="cover 3 targets"):
        recognisability_matrix({("a", "b"): (T([0, 1, 1]), T([0, 1]), T([0, 1]))})
    with pytest.raises(ValueError, match="empty"):
        recognisability_matrix({})
    with pytest.raises(ValueError, match="integer class ids"):
        recognisability_matrix({("a", "b"): (T([0.2, 1.0]), T([0, 1]), T([0, 1]))})
    with pytest.raises(ValueError, match="no column"):
        pivot_matrix([{"source": "a", "judge": "b"}], value="metamer_acc")


@pytest.mark.parametrize("chunk_entries", [1, 7, 1 << 24])
def test_null_distances_leave_out_self_and_twins(chunk_entries):
    """Thresholds by hand: the nearest other node that is not an exact twin; twins counted;
    targets outside the null set compare with every null node."""
    from fastmetamer.metamers.criterion import null_distances

    acts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [6.0, 8.0], [1.0, 0.0]])
    null_ids = torch.tensor([10, 11, 12, 13, 14])
    targets = torch.tensor([11, 14, 99])
    target_acts = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0]])
    null = null_distances(acts, null_ids, targets, target_acts, chunk_entries=chunk_entries)
    # node 11: itself left out, node 12 is a twin; nearest other: 14 at sqrt(2^2 + 4^2)
    # node 14: nearest other is node 10 at distance 1; node 99 (not in the null set): node 10 at 1
    assert null.threshold.tolist() == pytest.approx([math.sqrt(20.0), 1.0, 1.0])
    assert null.twins.tolist() == [1, 0, 0]
    # id -1 (a graph-level target, not in the null set): nothing left out, the last null node
    # (14, at distance 0.5) included
    outside = null_distances(acts, null_ids, torch.tensor([-1]), torch.tensor([[1.0, 0.5]]),
                             chunk_entries=chunk_entries)
    assert outside.threshold.tolist() == pytest.approx([0.5]) and outside.twins.tolist() == [0]


def test_binary_marginal_distance_by_counting_equals_the_sorted_w1():
    """The counting shortcut for 0/1 columns equals the exact sorted-quantile W1 (n != m too)."""
    from fastmetamer.analysis._common import wasserstein1_columns
    from fastmetamer.analysis.features import marginal_distance

    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(37, 9, generator=gen) < 0.3).float()
    ref = (torch.rand(23, 9, generator=gen) < 0.6).float()
    exact = float(wasserstein1_columns(x.double(), ref.double()).mean())
    assert marginal_distance(x, ref) == pytest.approx(exact, rel=1e-12, abs=1e-15)
    assert marginal_distance(x, ref) == pytest.approx(float((x.mean(0) - ref.mean(0)).abs().mean()), rel=1e-6)


def test_feature_metamer_reports_its_unchanged_structure_without_computing_it(graph):
    """The structure distances of a feature metamer are identities, equal to computing them on
    its (unchanged) edges."""
    import fastmetamer as fm
    from fastmetamer.analysis import structure_distances
    from fastmetamer.metamers import scoring

    torch.manual_seed(0)
    model = fm.models.GCN(12, 3, hidden=8, depth=2).eval()
    res = fm.generate(model, graph, [3, 4], steps=20, progress=False)
    assert res.metrics["structure"] == {k: [v, v] for k, v in scoring.UNCHANGED_STRUCTURE.items()}
    assert torch.equal(res.graph.edge_index, res.reference.edge_index)
    computed = structure_distances(res.graph.edge_index, res.reference.edge_index, res.graph.num_nodes,
                                   max_nodes=10_000)
    assert computed == pytest.approx(scoring.UNCHANGED_STRUCTURE)


def _grakel_wl(edges: list, n: int, ref_edges: list, m: int, labels: list, ref_labels: list, iterations: int):
    """The SPEC's definition: grakel's normalised WL subtree kernel with VertexHistogram."""
    from grakel import Graph
    from grakel.kernels import VertexHistogram, WeisfeilerLehman

    def graph(pairs, k, node_labels):
        adjacency = {v: [] for v in range(k)}
        for u, v in {tuple(sorted(p)) for p in pairs if p[0] != p[1]}:
            adjacency[u].append(v)
            adjacency[v].append(u)
        return Graph(adjacency, node_labels=dict(enumerate(node_labels)))

    kernel = WeisfeilerLehman(n_iter=iterations, base_graph_kernel=VertexHistogram, normalize=True)
    return min(1.0, float(kernel.fit_transform([graph(edges, n, labels), graph(ref_edges, m, ref_labels)])[0, 1]))


@settings(deadline=None, max_examples=30, derandomize=True)
@given(n=st.integers(1, 25), m=st.integers(1, 25), density=st.floats(0.0, 3.0), seed=st.integers(0, 2**16),
       label_kind=st.sampled_from(["degree", "int", "str"]), iterations=st.integers(1, 4))
def test_vectorised_wl_equals_grakel(n, m, density, seed, label_kind, iterations):
    """Random graphs with self loops, duplicate and reversed edges, isolated nodes and one-node
    graphs; degree labels, integer labels and string labels (compared across the two graphs)."""
    gen = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, int(density * n)), generator=gen)
    ref_ei = torch.randint(0, m, (2, int(density * m)), generator=gen)
    if m == n and seed % 2:  # a near copy: shares most labels with the reference
        ref_ei = ei[:, : max(0, ei.shape[1] - 1)]
    ints = torch.randint(0, 3, (n + m,), generator=gen).tolist()
    labels = {"degree": (None, None), "int": (T(ints[:n]), T(ints[n:])),
              "str": ([f"l{v}" for v in ints[:n]], [f"l{v}" for v in ints[n:]])}[label_kind]
    if label_kind == "degree":
        both = [torch.bincount(torch.unique(e.t()[e[0] != e[1]].sort(1).values, dim=0).flatten(), minlength=k).tolist()
                for e, k in ((ei, n), (ref_ei, m))]
    else:
        both = [list(map(str, ints[:n])), list(map(str, ints[n:]))]
    want = _grakel_wl(ei.t().tolist(), n, ref_ei.t().tolist(), m, *both, iterations)
    assert wl_similarity(ei, ref_ei, n, m, *labels, iterations=iterations) == approx(want, abs=1e-12)
