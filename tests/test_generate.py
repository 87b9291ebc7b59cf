"""End-to-end checks of fastmetamer.generate on the reference engine (SPEC §2, §8)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch_geometric.data import Batch, Data
from torch_geometric.nn.models import GCN, GIN, GraphSAGE

import fastmetamer as fm
from fastmetamer.graph.layers import count_hops, layer_output, resolve_layer
from fastmetamer.graph.subgraph import receptive_field

from conftest import awkward_graph


def relative_loss(model, layer, metamer: Data, reference: Data, center) -> torch.Tensor:
    """L_act recomputed from scratch by running the model on both graphs."""
    with torch.no_grad():
        a = layer_output(model, layer, metamer.x, metamer.edge_index, getattr(metamer, "edge_weight", None))
        r = layer_output(model, layer, reference.x, reference.edge_index,
                         getattr(reference, "edge_weight", None))
    center = torch.as_tensor(center).view(-1)
    return (a[center] - r[center]).pow(2).sum(1) / r[center].pow(2).sum(1)


# --- receptive fields -------------------------------------------------------------------------

def _pyg_models(in_dim):
    torch.manual_seed(0)
    return {
        "gcn": GCN(in_dim, 8, num_layers=2, out_channels=3),
        "sage": GraphSAGE(in_dim, 8, num_layers=3, out_channels=3, act="elu"),
        "gin": GIN(in_dim, 8, num_layers=2, out_channels=3),
        "zoo_gat": fm.models.GAT(in_dim, 3, hidden=8, depth=2),
        "zoo_appnp": fm.models.APPNP(in_dim, 3, hidden=8, depth=2, K=3),
        "zoo_sgc": fm.models.SGC(in_dim, 3, K=2),
    }


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), node=st.integers(0, 29))
def test_receptive_field_reproduces_full_graph(seed, n, node):
    """The extracted subgraph gives exactly the full-graph activation at the target, for every
    model family (GCN needs the outer ring's true degree)."""
    graph = awkward_graph(num_nodes=max(n, 4), seed=seed)
    node = node % graph.num_nodes
    for name, model in _pyg_models(graph.num_features).items():
        model.eval()
        layer = resolve_layer(model, None)
        hops = count_hops(model, layer, graph.x)
        sub = receptive_field(graph.x, graph.edge_index, None, torch.tensor([node]), hops)
        with torch.no_grad():
            full = layer_output(model, layer, graph.x, graph.edge_index)[node]
            part = layer_output(model, layer, sub.x, sub.edge_index)[sub.center[0]]
        torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5, msg=name)
        assert sub.node_ids[sub.center[0]] == node


def test_induced_subgraph_would_be_wrong_for_gcn():
    """Guard that the exactness test can fail: the naive induced 2-hop subgraph is not exact."""
    from torch_geometric.utils import k_hop_subgraph

    graph = awkward_graph(num_nodes=40, seed=3)
    model = _pyg_models(graph.num_features)["gcn"].eval()
    errors = []
    for node in range(30):
        subset, edges, mapping, _ = k_hop_subgraph(node, 2, graph.edge_index, relabel_nodes=True,
                                                   num_nodes=graph.num_nodes)
        with torch.no_grad():
            full = model(graph.x, graph.edge_index)[node]
            naive = model(graph.x[subset], edges)[mapping[0]]
        errors.append((full - naive).abs().max())
    assert max(errors) > 1e-3


def test_hop_counting():
    graph = awkward_graph()
    models = _pyg_models(graph.num_features)
    hops = {name: count_hops(m.eval(), resolve_layer(m, None), graph.x) for name, m in models.items()}
    assert hops == {"gcn": 2, "sage": 3, "gin": 2, "zoo_gat": 2, "zoo_appnp": 3, "zoo_sgc": 2}
    assert count_hops(models["gcn"], "convs.0", graph.x) == 1


# --- feature metamers -------------------------------------------------------------------------

def test_binary_feature_metamer(synthetic, pyg_gcn):
    node = int(synthetic.test_mask.nonzero()[0])
    res = fm.generate(pyg_gcn, synthetic, node, progress=False)
    free = res.graph.free_mask
    metamer, reference = res.graph.x[free], res.reference.x[free]
    assert res.loss < 1e-2 and res.passed
    assert set(metamer.unique().tolist()) <= {0.0, 1.0}
    assert metamer.sum() == reference.sum()  # exactly the reference density over R
    assert res.metrics["features"]["cosine"] < 0.5
    # frozen boundary nodes keep their features, edges untouched
    assert torch.equal(res.graph.x[~free], res.reference.x[~free])
    assert torch.equal(res.graph.edge_index, res.reference.edge_index)
    # running the model reproduces the reported loss and the full-graph reference output
    recomputed = relative_loss(pyg_gcn, res.layer, res.graph, res.reference, res.center)
    assert recomputed.item() == pytest.approx(res.loss, rel=1e-4, abs=1e-7)
    with torch.no_grad():
        full = pyg_gcn(synthetic.x, synthetic.edge_index)[node]
        sub = pyg_gcn(res.reference.x, res.reference.edge_index)[res.center]
    torch.testing.assert_close(sub, full, rtol=1e-5, atol=1e-5)
    assert res.history.dim() == 1 and res.history[0] > 10 * res.loss


@pytest.mark.parametrize("per_row", [False, True])
def test_best_binary_state_kept_by_its_ones_equals_the_dense_where(synthetic, pyg_gcn, monkeypatch, per_row):
    """The fused binary features keep their best state by its ones (a CSR merged row by row); the
    result (metamer, history) equals the generic path that builds the dense state and selects with
    ``where``. Refinement off, so the best state of the straight-through phase is what returns."""
    from fastmetamer.metamers.features import FusedBinaryFeatures
    from fastmetamer.ops import dispatch

    if not dispatch.is_available("cpu"):
        pytest.skip("cpu backend not built")
    nodes = synthetic.test_mask.nonzero().flatten()[:6].tolist()
    options = dict(steps=60, seed=2, refine_steps=0, per_row=per_row, progress=False, scores=False, backend="cpu")
    compact = fm.generate(pyg_gcn, synthetic, nodes, **options)
    monkeypatch.delattr(FusedBinaryFeatures, "best_ones")
    dense = fm.generate(pyg_gcn, synthetic, nodes, **options)
    assert torch.equal(compact.graph.x, dense.graph.x) and torch.equal(compact.history, dense.history)
    # the best state is not simply the last one: some targets' losses went up again
    assert bool((compact.history[-1] > compact.history.min(0).values).any())


def test_batched_targets_match_single_calls(synthetic, pyg_gcn):
    nodes = synthetic.test_mask.nonzero().flatten()[:4].tolist()
    batched = fm.generate(pyg_gcn, synthetic, nodes, steps=200, progress=False)
    assert batched.loss.shape == (4,) and batched.passed.shape == (4,)
    for i, node in enumerate(nodes):
        single = fm.generate(pyg_gcn, synthetic, node, steps=200, progress=False)
        assert batched.loss[i].item() == pytest.approx(single.loss, rel=1e-3, abs=1e-6)
    assert batched.graph.batch.max() == 3
    recomputed = relative_loss(pyg_gcn, batched.layer, batched.graph, batched.reference, batched.center)
    torch.testing.assert_close(recomputed, batched.loss, rtol=1e-4, atol=1e-7)


def test_seed_reproducible_and_seed_matters(synthetic, pyg_gcn):
    a = fm.generate(pyg_gcn, synthetic, 7, steps=50, seed=3, progress=False)
    b = fm.generate(pyg_gcn, synthetic, 7, steps=50, seed=3, progress=False)
    c = fm.generate(pyg_gcn, synthetic, 7, steps=50, seed=4, progress=False)
    assert torch.equal(a.graph.x, b.graph.x)
    assert not torch.equal(a.graph.x, c.graph.x)


def test_per_row_keeps_each_nodes_ones(synthetic, pyg_gcn):
    res = fm.generate(pyg_gcn, synthetic, 11, steps=300, per_row=True, progress=False)
    free = res.graph.free_mask
    assert torch.equal(res.graph.x[free].sum(1), res.reference.x[free].sum(1))
    assert res.loss < res.history[0]


@pytest.mark.parametrize("binary", [False, True])
def test_feature_stats_per_component(binary):
    """The statistics of each component's free rows (computed a block of rows at a time) against
    direct reductions: mean, population std, range, count of ones, and each row's ones; rows
    interleave components and span several blocks (ROW_BLOCK)."""
    from fastmetamer.graph.subgraph import Subgraph
    from fastmetamer.metamers.features import ROW_BLOCK, feature_stats, ones_per_row

    gen = torch.Generator().manual_seed(4)
    rows, d, c = 2 * ROW_BLOCK + 77, 13, 3
    x = (torch.rand(rows, d, generator=gen) < 0.3).float() if binary else torch.randn(rows, d, generator=gen)
    component = torch.randint(0, c, (rows,), generator=gen)
    free = torch.rand(rows, generator=gen) < 0.8
    sub = Subgraph(x=x, edge_index=torch.empty(2, 0, dtype=torch.long), edge_weight=None,
                   node_ids=torch.arange(rows), free=free, component=component, center=torch.zeros(c, dtype=torch.long),
                   num_components=c)
    stats = feature_stats(sub)
    for k in range(c):
        part = x[free & (component == k)].double()
        torch.testing.assert_close(stats.mean[k].double(), part.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.std[k].double(), part.std(0, unbiased=False), rtol=1e-4, atol=1e-5)
        assert torch.equal(stats.low[k], part.min(0).values.float())
        assert torch.equal(stats.high[k], part.max(0).values.float())
        assert int(stats.ones[k]) == int((part > 0.5).sum())
    assert torch.equal(ones_per_row(x), (x > 0.5).sum(1))


@pytest.mark.parametrize("threads", [1, 2])
def test_noise_is_each_components_own_stream(threads, monkeypatch):
    """Each component's noise rows are its generator's first draws, whether components are drawn
    one after the other (in the caller's thread) or on a pool of threads (an empty component
    included), and a redraw of some components leaves the others' rows untouched."""
    import threading

    from fastmetamer.metamers import features
    from fastmetamer.metamers.features import PARALLEL_NOISE_ENTRIES, draw_noise

    drawn_on = set()
    draw_into = features._draw_into

    def recording(rows, generator):
        drawn_on.add(threading.get_ident())
        draw_into(rows, generator)

    monkeypatch.setattr(features, "_draw_into", recording)

    d = 50
    sizes = [PARALLEL_NOISE_ENTRIES // d + 3, 0, 7, 900]
    ptr = torch.tensor([0, *sizes]).cumsum(0)
    seeds = [11, 12, 13, 14]
    expected = torch.cat([torch.randn(n, d, generator=torch.Generator().manual_seed(s)) for n, s in zip(sizes, seeds)])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        noise = draw_noise(ptr, d, [torch.Generator().manual_seed(s) for s in seeds])
        assert torch.equal(noise, expected)
        redrawn = draw_noise(ptr, d, [torch.Generator().manual_seed(s + 10) for s in seeds], noise.clone(), [0, 3])
    finally:
        torch.set_num_threads(previous)
    fresh = lambda c: torch.randn(sizes[c], d, generator=torch.Generator().manual_seed(seeds[c] + 10))  # noqa: E731
    assert torch.equal(redrawn[ptr[0]:ptr[1]], fresh(0)) and torch.equal(redrawn[ptr[3]:ptr[4]], fresh(3))
    assert torch.equal(redrawn[ptr[1]:ptr[3]], noise[ptr[1]:ptr[3]])
    main = threading.get_ident()
    assert drawn_on == {main} if threads == 1 else main not in drawn_on


def test_continuous_features_stay_in_range():
    graph = awkward_graph(num_nodes=50, num_features=6, seed=5)
    torch.manual_seed(0)
    model = GCN(6, 16, num_layers=2, out_channels=4).eval()
    res = fm.generate(model, graph, 0, steps=400, progress=False)
    free = res.graph.free_mask
    ref = res.reference.x[free]
    assert (res.graph.x[free] >= ref.min(0).values - 1e-6).all()
    assert (res.graph.x[free] <= ref.max(0).values + 1e-6).all()
    assert res.loss < 1e-3 and res.metrics["features"]["relative_l2"] > 0.5


def test_size_independent_mode_learns_only_statistics(synthetic, pyg_gcn):
    res = fm.generate(pyg_gcn, synthetic, 3, steps=300, size_independent=True, progress=False)
    assert res.loss < res.history[0]
    assert res.settings["size_independent"]


def test_whole_graph_metamer():
    graph = fm.datasets.synthetic_graph(num_nodes=150, num_features=40, seed=2)
    torch.manual_seed(0)
    from conftest import train_node_classifier
    model = train_node_classifier(GCN(40, 16, num_layers=2, out_channels=5), graph, epochs=50)
    res = fm.generate(model, graph, None, steps=300, progress=False)
    assert res.graph.num_nodes == graph.num_nodes and res.passed.shape == (graph.num_nodes,)
    assert isinstance(res.loss, float) and res.loss < 0.05
    assert res.graph.x.sum() == graph.x.sum()


# --- structure and joint metamers --------------------------------------------------------------

def _undirected_pairs(data: Data, nodes: torch.Tensor) -> set:
    mask = torch.zeros(data.num_nodes, dtype=torch.bool)
    mask[nodes] = True
    src, dst = data.edge_index
    keep = mask[src] & mask[dst] & (src != dst)
    return {(min(a, b), max(a, b)) for a, b in data.edge_index[:, keep].t().tolist()}


@pytest.mark.parametrize("dense_max_nodes", [10_000, 5])
def test_structure_metamer_keeps_budget(synthetic, dense_max_nodes):
    model = fm.models.GCN(synthetic.num_features, int(synthetic.y.max()) + 1, hidden=16)
    from conftest import train_node_classifier
    train_node_classifier(model, synthetic, epochs=60)
    res = fm.generate(model, synthetic, [5, 9], kind="structure", steps=150,
                      dense_max_nodes=dense_max_nodes, block_size=64, resample_every=20, progress=False)
    for c in range(2):
        nodes = ((res.graph.batch == c) & res.graph.free_mask).nonzero().flatten()
        new, old = _undirected_pairs(res.graph, nodes), _undirected_pairs(res.reference, nodes)
        assert len(new) == len(old) > 0
    src, dst = res.graph.edge_index
    free_pair = res.graph.free_mask[src] & res.graph.free_mask[dst]
    ref_src, ref_dst = res.reference.edge_index
    assert (src == dst).sum() == (ref_src == ref_dst).sum()  # no new self loops
    # symmetric: every edge among free nodes appears in both directions
    pairs = set(map(tuple, res.graph.edge_index[:, free_pair].t().tolist()))
    assert all((b, a) in pairs for a, b in pairs)
    assert torch.equal(res.graph.x, res.reference.x)
    assert (res.loss < res.history[0]).all()
    recomputed = relative_loss(model, res.layer, res.graph, res.reference, res.center)
    torch.testing.assert_close(recomputed, res.loss, rtol=1e-4, atol=1e-6)


def test_joint_metamer_changes_both(synthetic):
    model = fm.models.GCN(synthetic.num_features, int(synthetic.y.max()) + 1, hidden=16)
    from conftest import train_node_classifier
    train_node_classifier(model, synthetic, epochs=60)
    res = fm.generate(model, synthetic, 4, kind="joint", steps=300, progress=False)
    assert res.loss < 1e-2
    assert not torch.equal(res.graph.x, res.reference.x)
    assert res.metrics["structure"]["edge_jaccard"] < 1.0


# --- bad input (SPEC §8) ------------------------------------------------------------------------

@pytest.mark.parametrize("node, message", [
    (10_000, "out of range"), (-1, "out of range"), ([], "empty"), ([1, 1], "duplicate"),
    ("3", "node must be"), (True, "bool"), (1.5, "node must be"),
])
def test_bad_nodes(synthetic, pyg_gcn, node, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fm.generate(pyg_gcn, synthetic, node, steps=1, progress=False)


def _with(graph: Data, **fields) -> Data:
    out = graph.clone()
    for key, value in fields.items():
        setattr(out, key, value)
    return out


@pytest.mark.parametrize("fields, error, message", [
    ({"edge_index": torch.zeros(3, 4, dtype=torch.long)}, ValueError, r"shape \[2, num_edges\]"),
    ({"edge_index": torch.zeros(2, 4)}, TypeError, "dtype"),
    ({"edge_index": torch.tensor([[0, 1], [1, 10_000]])}, ValueError, "outside"),
    ({"edge_index": torch.tensor([[0, -1], [1, 2]])}, ValueError, "outside"),
    ({"x": None}, ValueError, "graph.x"),
    ({"edge_weight": torch.ones(3)}, ValueError, "edge_weight"),
])
def test_bad_graphs(synthetic, pyg_gcn, fields, error, message):
    with pytest.raises(error, match=message):
        fm.generate(pyg_gcn, _with(synthetic, **fields), 0, steps=1, progress=False)


def test_nan_features(synthetic, pyg_gcn):
    x = synthetic.x.clone()
    x[5, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fm.generate(pyg_gcn, _with(synthetic, x=x), 0, steps=1, progress=False)


def test_not_a_graph(pyg_gcn):
    with pytest.raises(TypeError, match="Data"):
        fm.generate(pyg_gcn, {"x": torch.zeros(2, 2)}, 0)


def test_unknown_layer_lists_valid_names(synthetic, pyg_gcn):
    with pytest.raises(ValueError, match="convs.1"):
        fm.generate(pyg_gcn, synthetic, 0, layer="convs.7", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        fm.generate(pyg_gcn, synthetic, 0, layer=5, progress=False)


def test_bad_kind_option_steps(synthetic, pyg_gcn):
    with pytest.raises(ValueError, match="kind"):
        fm.generate(pyg_gcn, synthetic, 0, kind="edges")
    with pytest.raises(TypeError, match="unknown option"):
        fm.generate(pyg_gcn, synthetic, 0, learning_rate=3)
    with pytest.raises(ValueError, match="steps"):
        fm.generate(pyg_gcn, synthetic, 0, steps=0)
    with pytest.raises(ValueError, match="backend"):
        fm.generate(pyg_gcn, synthetic, 0, backend="tpu")


def test_structure_needs_edge_weights(synthetic):
    torch.manual_seed(0)
    sage = GraphSAGE(synthetic.num_features, 8, num_layers=2, out_channels=5).eval()
    with pytest.raises(ValueError, match="ignores edge_weight"):
        fm.generate(sage, synthetic, 0, kind="structure", progress=False)
    mlp = fm.models.MLP(synthetic.num_features, 5, hidden=8)
    with pytest.raises(ValueError, match="ignores edge_weight|no message-passing"):
        fm.generate(mlp, synthetic, 0, kind="structure", layer="layers.1", progress=False)


def test_structure_needs_edges(pyg_gcn, synthetic):
    empty = _with(synthetic, edge_index=torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="no edges"):
        fm.generate(pyg_gcn, empty, 0, kind="structure", progress=False)


def test_feature_metamer_on_graph_without_edges_and_single_node(pyg_gcn, synthetic):
    empty = _with(synthetic, edge_index=torch.zeros(2, 0, dtype=torch.long))
    res = fm.generate(pyg_gcn, empty, 0, steps=50, progress=False)
    assert res.graph.num_nodes == 1
    one = Data(x=synthetic.x[:1], edge_index=torch.zeros(2, 0, dtype=torch.long))
    res = fm.generate(pyg_gcn, one, 0, steps=50, progress=False)
    assert res.graph.num_nodes == 1 and torch.isinf(res.null_threshold).all()


# --- result -------------------------------------------------------------------------------------

def test_result_save_load_and_dict(tmp_path, synthetic, pyg_gcn):
    import json

    res = fm.generate(pyg_gcn, synthetic, [2, 3], steps=20, progress=False)
    res.save(tmp_path / "res.pt")
    again = fm.MetamerResult.load(tmp_path / "res.pt")
    assert torch.equal(again.graph.x, res.graph.x) and torch.equal(again.loss, res.loss)
    summary = json.loads((tmp_path / "res.json").read_text())
    assert summary["nodes"] == [2, 3] and len(summary["loss"]) == 2
    assert summary == json.loads(json.dumps(res.to_dict()))


# --- graph-level metamers ----------------------------------------------------------------------

def test_graph_level_metamer_matches_pooled_embedding():
    graphs = fm.datasets.synthetic_graphs(num_graphs=40, seed=0)
    torch.manual_seed(0)
    model = fm.models.GIN(graphs[0].num_features, 2, hidden=16, pool="add")
    fm.models.train(model, graphs, epochs=20)
    graph = graphs[0]
    res = fm.generate(model, graph, None, layer="readout", kind="features", binary=False, steps=400,
                      null_graphs=graphs[1:], progress=False)
    assert res.graph.num_nodes == graph.num_nodes
    with torch.no_grad():
        a = model.readout(layer_output(model, "layers.1", res.graph.x, res.graph.edge_index))
        r = model.readout(layer_output(model, "layers.1", graph.x, graph.edge_index))
    assert ((a - r).pow(2).sum() / r.pow(2).sum()).item() == pytest.approx(res.loss, rel=1e-3, abs=1e-7)
    assert res.loss < 1e-3 and bool(res.passed[0])
    assert res.metrics["features"]["relative_l2"] > 0.3
    assert res.settings["null_graphs"] == len(graphs) - 1  # the count, not the graphs
    with pytest.raises(ValueError, match="graph-level"):
        fm.generate(model, graph, 0, layer="readout", progress=False)
    alone = fm.generate(model, graph, None, layer="readout", steps=5, progress=False)
    assert not bool(alone.passed[0])  # no null graphs: the criterion cannot pass


def test_zero_reference_activation_keeps_losses_finite():
    """A target whose reference activation is exactly zero (e.g. a dead ReLU readout) has no
    relative loss: it is scaled by the other targets' mean ||H||^2 (1 if all are zero), so the
    loss stays finite (it overflowed to inf / NaN before)."""
    from fastmetamer.engines import ReferenceEngine, loss_scale
    from fastmetamer.graph.subgraph import whole_graph

    target = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    assert loss_scale(target, joint=False).tolist() == [13.0, 25.0, 1.0]
    assert loss_scale(torch.zeros(2, 3), joint=False).tolist() == [1.0, 1.0]
    assert loss_scale(target, joint=True).tolist() == [26.0]
    graphs = fm.datasets.synthetic_graphs(num_graphs=2, seed=2)
    torch.manual_seed(0)
    model = fm.models.GCN(graphs[0].num_features, 2, hidden=8, pool="add").eval()
    batch = Batch.from_data_list([Data(x=g.x, edge_index=g.edge_index) for g in graphs])
    sub = whole_graph(batch.x, batch.edge_index, None, batch=batch.batch)
    sub.center = torch.arange(2)
    with torch.no_grad():
        pooled = layer_output(model, "readout", batch.x, batch.edge_index, None, batch.batch)
    dead = torch.stack([torch.zeros_like(pooled[0]), pooled[1]])  # graph 0's reference is all zero
    losses = ReferenceEngine(model, "readout", sub, dead, joint=False).losses(batch.x, batch.edge_index, None)
    assert torch.isfinite(losses).all() and float(losses[1]) == 0.0
    assert float(losses[0]) == pytest.approx(float(pooled[0].pow(2).sum() / pooled[1].pow(2).sum()), rel=1e-5)


def test_batched_graph_level_metamers_equal_single_calls():
    """A Batch of graphs gives one independent metamer per graph, each the metamer a call on
    that graph alone gives (same draws, per-graph pooling, losses and early stopping)."""
    graphs = fm.datasets.synthetic_graphs(num_graphs=40, seed=1)
    torch.manual_seed(0)
    model = fm.models.GCN(graphs[0].num_features, 2, hidden=16, pool="add")
    fm.models.train(model, graphs, epochs=10)
    targets = [Data(x=g.x, edge_index=g.edge_index) for g in graphs[:4]]
    options = dict(layer="readout", steps=120, refine_steps=30, seed=3, null_graphs=graphs[10:], progress=False)
    batched = fm.generate(model, Batch.from_data_list(targets), None, **options)
    singles = [fm.generate(model, g, None, **options) for g in targets]
    assert batched.loss.shape == (4,) and batched.passed.shape == (4,)
    assert batched.loss.tolist() == pytest.approx([float(s.loss) for s in singles], rel=1e-3, abs=1e-6)
    assert batched.passed.tolist() == [bool(s.passed[0]) for s in singles]
    assert batched.null_threshold.tolist() == pytest.approx([float(s.null_threshold[0]) for s in singles])
    for i, single in enumerate(singles):
        mine = batched.graph.batch == i
        assert torch.allclose(batched.graph.x[mine], single.graph.x, atol=1e-4)
        assert batched.metrics["features"]["cosine"][i] == pytest.approx(single.metrics["features"]["cosine"], abs=1e-4)
    with pytest.raises(ValueError, match="sorted graph ids"):
        fm.generate(model, Data(x=targets[0].x, edge_index=targets[0].edge_index,
                                batch=torch.arange(targets[0].num_nodes).flip(0)), None, **options)


@pytest.mark.parametrize("arch,pool", [("gat", "add"), ("appnp", "mean"), ("gin", "max")])
def test_graph_level_batches_run_on_the_fast_engine(arch, pool):
    """Pooled readouts lower: a Batch of graphs on the cpu backend runs without the fallback
    warning and follows the reference engine's trajectory, and the metamers pass."""
    import warnings

    from fastmetamer.ops import dispatch

    if not dispatch.is_available("cpu"):
        pytest.skip("cpu backend not built")
    graphs = fm.datasets.synthetic_graphs(num_graphs=40, seed=1)
    torch.manual_seed(0)
    model = fm.models.build_model(arch, graphs[0].num_features, 2, hidden=16, pool=pool,
                                  **({"K": 3} if arch == "appnp" else {}))
    fm.models.train(model, graphs, epochs=10)
    batch = Batch.from_data_list([Data(x=g.x, edge_index=g.edge_index) for g in graphs[:3]])
    options = dict(layer="readout", binary=False, steps=200, seed=3, null_graphs=graphs[10:], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback to the reference engine warns
        fast = fm.generate(model, batch, None, backend="cpu", **options)
    ref = fm.generate(model, batch, None, backend="reference", **options)
    torch.testing.assert_close(fast.history[:10], ref.history[:10], rtol=1e-3, atol=1e-6)
    assert bool(fast.passed.all()) and float(fast.loss.max()) < 1e-3


def _flat_metrics(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in metrics.items():
        out.update(_flat_metrics(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("kind", ["features", "structure"])
def test_chunked_targets_equal_one_unchunked_call(synthetic, pyg_gcn, kind):
    """A memory budget too small for two problems solves every target alone; the merged result
    is the one call over all of them: metamers, losses, flags, histories (padded per phase:
    targets stop at different steps) and metrics."""
    nodes = list(range(0, 24, 4))
    options = dict(kind=kind, steps=40, refine_steps=30, progress=False)
    whole = fm.generate(pyg_gcn, synthetic, nodes, **options)
    split = fm.generate(pyg_gcn, synthetic, nodes, memory_budget=1, **options)
    for name in ("x", "edge_index", "n_id", "free_mask", "batch", "center"):
        assert torch.equal(getattr(split.graph, name), getattr(whole.graph, name)), name
        assert torch.equal(getattr(split.reference, name), getattr(whole.reference, name)), name
    for name in ("loss", "history", "passed", "trivial", "distance", "null_threshold", "twins", "center"):
        assert torch.equal(getattr(split, name), getattr(whole, name)), name
    assert split.gradient_steps == whole.gradient_steps and split.nodes == whole.nodes
    got, want = _flat_metrics(split.metrics), _flat_metrics(whole.metrics)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12, nan_ok=True), key


@pytest.mark.parametrize("kind", ["features", "structure", "joint"])
def test_a_result_without_its_copied_rows_is_restored_exactly(synthetic, pyg_gcn, kind):
    """Chunks and ranks keep a result without the feature rows it copies from the input graph:
    every row outside the free rows, in the metamer and the reference, is the input's row."""
    from fastmetamer.metamers import chunks

    result = fm.generate(pyg_gcn, synthetic, [0, 9, 31], kind=kind, steps=10, refine_steps=5, progress=False)
    metamer, reference = result.graph.x.clone(), result.reference.x.clone()
    stripped = chunks.without_copied_rows(result)
    free = int(result.graph.free_mask.sum())
    assert stripped.reference.x is None and stripped.graph.x.shape == (free, synthetic.x.shape[1])
    assert free < result.graph.n_id.numel() / 2, "the frozen rows are most of a problem graph"
    restored = chunks.with_copied_rows(stripped, synthetic)
    assert torch.equal(restored.graph.x, metamer) and torch.equal(restored.reference.x, reference)


def test_merged_history_pads_a_chunk_whose_search_did_not_run():
    """A chunk that stopped before the swap search (no search rows) shows its final losses
    through the other chunks' search; gradient phases pad with their last row."""
    from types import SimpleNamespace

    from fastmetamer.metamers.chunks import _merged_history

    searched = SimpleNamespace(history=torch.arange(16.0).view(8, 2), gradient_steps=5, loss=torch.tensor([9.0, 9.0]))
    stopped = SimpleNamespace(history=torch.full((4, 1), 3.0), gradient_steps=4, loss=torch.tensor([2.5]))
    merged, gradient = _merged_history([searched, stopped])
    assert gradient == 5 and merged.shape == (8, 3)
    assert torch.equal(merged[:, :2], searched.history)
    assert merged[:5, 2].tolist() == [3.0] * 5 and merged[5:, 2].tolist() == [2.5] * 3


def test_memory_budget_is_validated(synthetic, pyg_gcn):
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="memory_budget"):
            fm.generate(pyg_gcn, synthetic, [0, 1], steps=2, progress=False, memory_budget=bad)


@pytest.mark.parametrize("kind, node, tol", [("features", [3, 40, 77], 1e-5), ("structure", [3, 40], 1e-5),
                                             ("features", None, 0.05)])
def test_reading_the_device_flags_every_k_steps_changes_nothing(synthetic, pyg_gcn, kind, node, tol):
    """The step loop reads its early-stop flags every ``sync_every`` steps (a GPU's default is 16):
    without restarts the steps run past the last freeze change nothing and are cut, so the result
    equals the one read every step (the whole graph with a loose ``tol`` freezes early)."""
    runs = [fm.generate(pyg_gcn, synthetic, node, kind=kind, steps=40, restart_patience=None, tol=tol,
                        refine_steps=5, sync_every=every, scores=False) for every in (1, 7)]
    assert torch.equal(runs[0].history, runs[1].history)
    assert torch.equal(runs[0].graph.x, runs[1].graph.x)
    assert torch.equal(runs[0].graph.edge_index, runs[1].graph.edge_index)
    if node is None:
        assert runs[0].gradient_steps < 40 and runs[0].gradient_steps % 7, "the run does not exercise the cut"


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_bad_sync_every(synthetic, pyg_gcn, every):
    with pytest.raises(ValueError, match="sync_every"):
        fm.generate(pyg_gcn, synthetic, [3], steps=5, sync_every=every)
