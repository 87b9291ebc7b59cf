"""The success criterion's null set: every real node by default (one cached whole-graph pass),
a random sample only when the caller asks for one, and the result says which."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
import torch

import fastmetamer as fm
from fastmetamer.engines import passes
from fastmetamer.engines.passes import full_graph_activations
from fastmetamer.ops import dispatch
from fastmetamer.graph.layers import layer_output
from fastmetamer.metamers import criterion
from fastmetamer.metamers.criterion import whole_graph_passes

STEPS = dict(steps=30, progress=False, scores=False, refine_steps=0)


@pytest.fixture()
def zoo_gcn():
    torch.manual_seed(0)
    return fm.models.GCN(12, 3, hidden=8, depth=2).eval()


def counting(monkeypatch, graph):
    """Record the whole-graph passes (by the model, ``backend="reference"``, or through the
    lowered program): calls on ``graph``'s own features."""
    calls = []
    real_model_pass, real_lowered_pass = passes.layer_output, passes.FastEngine.all_activations

    def model_pass(model, layer, x, *args, **kwargs):
        if x is graph.x:
            calls.append(layer)
        return real_model_pass(model, layer, x, *args, **kwargs)

    def lowered_pass(engine, x, *args):
        if x is graph.x:
            calls.append(engine.layer)
        return real_lowered_pass(engine, x, *args)

    monkeypatch.setattr(passes, "layer_output", model_pass)
    monkeypatch.setattr(passes.FastEngine, "all_activations", lowered_pass)
    return calls


def test_whole_graph_pass_is_cached_until_model_or_graph_changes(graph, zoo_gcn, monkeypatch):
    calls = counting(monkeypatch, graph)
    first = full_graph_activations(zoo_gcn, "layers.1", graph)
    assert torch.allclose(first, layer_output(zoo_gcn, "layers.1", graph.x, graph.edge_index), atol=1e-5)
    assert full_graph_activations(zoo_gcn, "layers.1", graph) is first and calls == ["layers.1"]
    before = full_graph_activations(zoo_gcn, "layers.0", graph)  # another layer: a new pass
    with torch.no_grad():
        next(zoo_gcn.parameters()).add_(1.0)  # a training step in place
    changed = full_graph_activations(zoo_gcn, "layers.0", graph)
    assert calls == ["layers.1", "layers.0", "layers.0"]
    assert torch.allclose(changed, layer_output(zoo_gcn, "layers.0", graph.x, graph.edge_index), atol=1e-5)
    assert not torch.equal(changed, before)
    other = graph.clone()  # equal values, other tensors: a new pass
    assert torch.allclose(full_graph_activations(zoo_gcn, "layers.0", other), changed, atol=1e-6)
    assert passes._LAST_PASS.refs[1]() is other.x


def test_generate_reuses_the_cached_pass(graph, zoo_gcn, monkeypatch):
    calls = counting(monkeypatch, graph)
    fm.generate(zoo_gcn, graph, 4, **STEPS)
    fm.generate(zoo_gcn, graph, [5, 6], **STEPS)
    assert len(calls) == 1  # one pass over the whole graph for both calls


def test_null_set_is_every_node_unless_a_sample_is_asked_for(graph, zoo_gcn):
    """A sampled null set can only miss near neighbours: its thresholds are never below the
    exact ones, and the result records the sample size."""
    nodes = [0, 4, 7, 20]
    exact = fm.generate(zoo_gcn, graph, nodes, **STEPS)
    acts = layer_output(zoo_gcn, exact.layer, graph.x, graph.edge_index).double()
    dist = torch.cdist(acts[nodes], acts)
    dist[torch.arange(len(nodes)), torch.tensor(nodes)] = float("inf")
    dist[dist <= 1e-6 * acts[nodes].norm(dim=1, keepdim=True)] = float("inf")  # twins left out
    assert torch.allclose(exact.null_threshold.double(), dist.min(1).values, rtol=1e-5)
    assert exact.settings["null_sample"] is None
    sampled = fm.generate(zoo_gcn, graph, nodes, null_sample=5, **STEPS)
    assert sampled.settings["null_sample"] == 5
    assert bool((sampled.null_threshold >= exact.null_threshold).all())
    assert bool((sampled.null_threshold > exact.null_threshold).any())
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="null_sample"):
            fm.generate(zoo_gcn, graph, nodes, null_sample=bad, **STEPS)


def test_whole_graph_metamer_makes_one_pass_for_reference_and_criterion(graph, zoo_gcn, monkeypatch):
    calls = counting(monkeypatch, graph)
    fm.generate(zoo_gcn, graph, None, **STEPS)
    assert len(calls) == 1


def brute_force(acts, metamer_acts, rtol=1e-6):
    """All nearest non-twin neighbours in float64 (O(n^2)): (passed, threshold, twins)."""
    h = acts.double()
    dist = torch.cdist(h, h)
    dist.fill_diagonal_(float("inf"))
    twin = dist <= rtol * h.norm(dim=1, keepdim=True)
    threshold = dist.masked_fill(twin, float("inf")).min(1).values
    distance = (metamer_acts.double() - h).norm(dim=1)
    return distance < threshold, threshold, twin.sum(1)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 120), d=st.integers(1, 6), twins=st.integers(0, 10),
       scale=st.sampled_from([1e-4, 1e-2, 0.3, 3.0]), chunk=st.sampled_from([1, 13, 1 << 22]),
       dense_width=st.sampled_from([0, 8, 512]), all_pairs=st.booleans(),
       tree=st.sampled_from([(), (1, 3), (32, 256, 2048)]), some=st.booleans())
def test_whole_graph_range_query_equals_brute_force(seed, n, d, twins, scale, chunk, dense_width, all_pairs, tree,
                                                    some):
    """Same flags and twin counts as brute force, with exact twins, ties in the projection, tiny
    and huge metamer distances, windows scanned by rounds (``dense_width``), then in k-d tree
    order (``tree``: neighbours asked per round; few leave nodes to the dense scan, none sends
    them all there), and the small-graph path that computes every pair (``all_pairs``); the
    threshold certifies each flag. With ``some``, only a random subset of the nodes is decided
    (``queries``, in random order: a rank's own nodes), against every node."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, d, generator=gen).round(decimals=1)  # ties and clusters
    copies = torch.randint(0, n, (min(twins, n),), generator=gen)
    acts[torch.randint(0, n, (copies.numel(),), generator=gen)] = acts[copies]  # exact twins
    metamer = acts + scale * torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen)
    defaults = criterion.DENSE_WIDTH, criterion.BRUTE_FORCE_PAIRS, criterion.TREE_NEIGHBOURS
    criterion.DENSE_WIDTH, criterion.BRUTE_FORCE_PAIRS = dense_width, n * n if all_pairs else 0
    criterion.TREE_NEIGHBOURS = tree
    queries = torch.randperm(n, generator=gen)[:max(1, n // 3)] if some else None
    try:
        passed, distance, null = whole_graph_passes(acts, metamer, chunk_entries=chunk, queries=queries)
    finally:
        criterion.DENSE_WIDTH, criterion.BRUTE_FORCE_PAIRS, criterion.TREE_NEIGHBOURS = defaults
    expected, threshold, twin_count = brute_force(acts, metamer)
    if some:
        acts, metamer, expected, threshold, twin_count = (t[queries] for t in (acts, metamer, expected, threshold,
                                                                             twin_count))
    assert torch.equal(passed, expected) and passed.shape == distance.shape == expected.shape
    assert torch.equal(null.twins, twin_count)
    bound = null.threshold.double()
    dist64 = (metamer.double() - acts.double()).norm(dim=1)
    assert bool((bound[passed] > dist64[passed]).all()) and bool((bound[passed] <= threshold[passed] * (1 + 1e-6)).all())
    assert bool((bound[~passed] <= dist64[~passed] * (1 + 1e-6)).all())
    assert bool((bound[~passed] >= threshold[~passed] * (1 - 1e-6)).all())


def test_whole_graph_metamer_uses_the_range_query(graph, zoo_gcn):
    res = fm.generate(zoo_gcn, graph, None, **STEPS)
    acts = layer_output(zoo_gcn, res.layer, graph.x, graph.edge_index)
    expected, _, twins = brute_force(acts, layer_output(zoo_gcn, res.layer, res.graph.x, res.graph.edge_index))
    assert torch.equal(res.passed, expected) and torch.equal(res.twins, twins)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("arch", ["gcn", "graphsage", "gin", "sgc", "appnp"])
def test_whole_graph_pass_lowered_or_not_equals_the_model(graph, arch, backend, monkeypatch):
    """Every layer's whole-graph pass, through the lowered program or the model's own forward
    (``backend="reference"``, or a model that does not lower), equals ``layer_output``."""
    calls = counting(monkeypatch, graph)
    torch.manual_seed(1)
    options = {"sgc": {"K": 3}, "appnp": {"K": 3, "residual": True}}.get(arch, {"depth": 2})
    model = fm.models.build_model(arch, 12, 3, hidden=8, **options).eval()
    layers = [f"layers.{i}" for i in range(len(model.layers))]
    for layer in layers:
        expected = layer_output(model, layer, graph.x, graph.edge_index)
        assert torch.allclose(full_graph_activations(model, layer, graph, backend=backend), expected,
                              rtol=1e-5, atol=1e-5)
        lowered = passes._forward_engine(model, layer, dispatch.resolve(backend, graph.x.device)) is not None
        assert lowered == (backend == "auto")
    assert len(calls) == len(layers)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", ["GCN", "GraphSAGE", "GIN"])
def test_whole_graph_pass_of_pyg_models_equals_their_forward(graph, name, weighted):
    """PyG's own models through the lowered pass, on a graph with a self loop, a duplicate edge,
    isolated nodes and a hub: without edge weights the pass propagates over the in-edge CSR with
    unit weights and per-node scales (PyG's ``gcn_norm`` replaces a self loop by one of weight 1;
    GIN's 1 + eps); with edge weights, GCN's weighted operator (GraphSAGE and GIN ignore them)."""
    from torch_geometric.nn import models

    torch.manual_seed(2)
    model = getattr(models, name)(12, 8, num_layers=2, out_channels=3, **({"train_eps": True} if name == "GIN" else {}))
    if name == "GIN":
        for conv in model.convs:
            conv.eps.data.fill_(0.3)
    model.eval()
    g = graph.clone()
    g.edge_weight = torch.rand(g.num_edges, generator=torch.Generator().manual_seed(4)) + 0.5 if weighted else None
    assert passes._forward_engine(model, "convs.1", "cpu") is not None
    for layer in ("convs.0", "convs.1"):
        expected = layer_output(model, layer, g.x, g.edge_index, g.edge_weight)
        assert torch.allclose(full_graph_activations(model, layer, g), expected, rtol=1e-5, atol=1e-5)


def brute_null(null_acts, null_ids, target_ids, target_acts, rtol=1e-6):
    """Thresholds and twins of every target against the null set in float64, pair by pair."""
    h, acts = null_acts.double(), target_acts.double()
    dist = (acts[:, None, :] - h[None, :, :]).norm(dim=2)
    dist[target_ids[:, None] == null_ids[None, :]] = float("inf")  # the target itself
    twin = dist <= rtol * acts.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return dist.masked_fill(twin, float("inf")).min(1).values, twin.sum(1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 80), d=st.integers(1, 6), twins=st.integers(0, 6),
       offset=st.sampled_from([0.0, 1.0, 1e3]), spread=st.sampled_from([1e-5, 1e-2, 1.0]),
       chunk=st.sampled_from([1, 13, 1 << 22]))
def test_null_distances_equal_brute_force(seed, n, d, twins, offset, spread, chunk):
    """The float32 prefilter never changes a threshold or a twin count: exact twins, ties, points
    far from the origin and close together (where a float32 product cancels), targets in and
    outside the null set, chunks of any size."""
    from fastmetamer.metamers.criterion import null_distances

    gen = torch.Generator().manual_seed(seed)
    null_acts = offset + spread * torch.randn(n, d, generator=gen).round(decimals=1)
    copies = torch.randint(0, n, (min(twins, n),), generator=gen)
    null_acts[torch.randint(0, n, (copies.numel(),), generator=gen)] = null_acts[copies]
    null_ids = torch.randperm(3 * n, generator=gen)[:n]
    inside = torch.randint(0, n, (4,), generator=gen)
    target_ids = torch.cat([null_ids[inside], torch.tensor([-1])])
    target_acts = torch.cat([null_acts[inside], offset + spread * torch.randn(1, d, generator=gen)])
    got = null_distances(null_acts, null_ids, target_ids, target_acts, chunk_entries=chunk)
    threshold, twin_count = brute_null(null_acts, null_ids, target_ids, target_acts)
    assert torch.equal(got.twins, twin_count)
    assert torch.equal(got.threshold, threshold.float())
