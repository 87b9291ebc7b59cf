"""Local metamer dimension and volume (SPEC §3) against a dense float64 ``torch.func.jacrev``
Jacobian of the FULL graph, on small awkward graphs (isolated nodes, self loops, duplicate
edges, a hub) whose receptive fields are cut by the l-hop boundary."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.utils import k_hop_subgraph

import fastmetamer as fm
from fastmetamer.analysis import dimension as dim_module
from fastmetamer.analysis.dimension import metamer_dimension
from fastmetamer.graph.layers import count_hops, layer_output, resolve_layer
from fastmetamer.models.convs import WeightedGCNConv

from conftest import awkward_graph

NUM_NODES, NUM_FEATURES, NUM_CLASSES = 30, 5, 6


@pytest.fixture(scope="module")
def graph() -> Data:
    return awkward_graph(NUM_NODES, NUM_FEATURES, seed=3)


def zoo_model(name: str, act: str, shift: float = -0.2, seed: int = 0) -> nn.Module:
    """A small zoo model (hidden 8, 6 outputs; biases shifted down so that some ReLUs die and
    some targets are rank deficient, others not)."""
    torch.manual_seed(seed)
    depth = {} if name == "sgc" else {"depth": 2}
    model = fm.models.build_model(name, NUM_FEATURES, NUM_CLASSES, hidden=8, act=act, **depth).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "bias" in pname:
                param.add_(shift)
    return model


def dense_reference(model: nn.Module, graph: Data, layer, wrt: str) -> list[Tensor]:
    """Per node v, J_v restricted to its inputs (dense, float64, from the full-graph jacrev);
    also checks that J_v vanishes on every input outside the receptive field."""
    model64 = copy.deepcopy(model).double()
    name = resolve_layer(model, layer)
    hops = count_hops(model, name, graph.x)
    x = graph.x.double()
    weight = torch.ones(graph.edge_index.shape[1], dtype=torch.float64)
    if wrt == "edges":
        full = torch.func.jacrev(lambda w: layer_output(model64, name, x, graph.edge_index, w))(weight)
    else:
        full = torch.func.jacrev(lambda x_: layer_output(model64, name, x_, graph.edge_index))(x)
    jacobians = []
    for v in range(graph.num_nodes):
        field = k_hop_subgraph(v, hops, graph.edge_index, num_nodes=graph.num_nodes)[0]
        inside = torch.zeros(graph.num_nodes, dtype=torch.bool)
        inside[field] = True
        if wrt == "edges":
            among = inside[graph.edge_index[0]] & inside[graph.edge_index[1]]
            jacobians.append(full[v][:, among])
            continue
        assert torch.all(full[v][:, ~inside] == 0)
        chosen = torch.tensor([v]) if wrt == "self" else field
        jacobians.append(full[v][:, chosen].reshape(full.shape[1], -1))
    return jacobians



def assert_matches_dense(result, jacobians) -> None:
    for v, jac in enumerate(jacobians):
        rank = int(torch.linalg.matrix_rank(jac)) if jac.numel() else 0
        sigma = torch.linalg.svdvals(jac) if jac.numel() else torch.zeros(0, dtype=torch.float64)
        log_volume = sigma[:rank].log().sum()
        assert int(result.rank[v]) == rank, (v, sigma, result.singular_values[v])
        assert int(result.input_dim[v]) == jac.shape[1]
        assert int(result.dimension[v]) == jac.shape[1] - rank
        assert int(result.rank_deficit[v]) == jac.shape[0] - rank
        assert torch.allclose(result.log_volume[v], log_volume, rtol=1e-3, atol=1e-6)
        assert torch.allclose(result.singular_values[v][:rank], sigma[:rank], rtol=1e-6)


@pytest.mark.parametrize("act", ["relu", "elu"])
@pytest.mark.parametrize("name", ["gcn", "graphsage", "gat"])
@pytest.mark.parametrize("layer", [None, 0])
def test_features_match_dense_jacrev(graph, name, act, layer):
    model = zoo_model(name, act)
    result = metamer_dimension(model, graph, layer=layer)
    assert_matches_dense(result, dense_reference(model, graph, layer, "features"))
    assert result.log_volume.dtype == torch.float64 and result.rank.dtype == torch.long


def test_cases_are_nontrivial(graph):
    """The agreement tests above cover full-rank and rank-deficient targets, and targets whose
    receptive field is cut by the boundary (GCN's boundary ring matters)."""
    result = metamer_dimension(zoo_model("gcn", "relu"), graph)
    assert (result.rank_deficit > 0).any() and (result.rank_deficit == 0).any()
    hops = 2
    cut = [v for v in range(NUM_NODES)
           if 0 < k_hop_subgraph(v, hops, graph.edge_index, num_nodes=NUM_NODES)[0].numel() < NUM_NODES
           and k_hop_subgraph(v, hops + 1, graph.edge_index, num_nodes=NUM_NODES)[0].numel()
           > k_hop_subgraph(v, hops, graph.edge_index, num_nodes=NUM_NODES)[0].numel()]
    assert len(cut) > 5


@pytest.mark.parametrize("name", ["gin", "gatv2", "sgc", "appnp", "mlp"])
def test_other_zoo_models_match_dense_jacrev(graph, name):
    model = zoo_model(name, "relu")
    assert_matches_dense(metamer_dimension(model, graph), dense_reference(model, graph, None, "features"))


@pytest.mark.parametrize("name", ["gcn", "graphsage"])
def test_wrt_self_matches_dense(graph, name):
    model = zoo_model(name, "elu")
    result = metamer_dimension(model, graph, wrt="self")
    assert_matches_dense(result, dense_reference(model, graph, None, "self"))
    assert torch.all(result.input_dim == NUM_FEATURES)


@pytest.mark.parametrize("name", ["gcn", "graphsage", "gat"])
def test_wrt_edges_matches_dense(graph, name):
    model = zoo_model(name, "elu")
    result = metamer_dimension(model, graph, wrt="edges")
    assert_matches_dense(result, dense_reference(model, graph, None, "edges"))
    assert (result.input_dim == 0).any()  # isolated nodes have no edges around them


def test_all_nodes_equal_single_calls_and_any_chunking(graph, monkeypatch):
    model = zoo_model("gcn", "relu")
    every = metamer_dimension(model, graph)
    assert torch.equal(every.nodes, torch.arange(NUM_NODES))
    for v in [0, 1, 7, NUM_NODES - 1]:
        one = metamer_dimension(model, graph, v)
        assert one.rank.tolist() == [int(every.rank[v])]
        assert torch.allclose(one.log_volume, every.log_volume[v:v + 1], rtol=1e-10)
    picked = [17, 0, 5]
    some = metamer_dimension(model, graph, picked, batch_size=2)
    assert some.nodes.tolist() == picked
    assert torch.equal(some.dimension, every.dimension[picked])
    chunked = metamer_dimension(model, graph, memory_budget=1)  # one target per chunk
    assert torch.equal(chunked.rank, every.rank)
    assert torch.allclose(chunked.log_volume, every.log_volume, rtol=1e-10)


def test_model_untouched_and_to_dict(graph):
    model = zoo_model("gat", "relu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = metamer_dimension(model, graph, [2, 3], tol=1e-6)
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["nodes"] == [2, 3] and payload["layer"] == "layers.1" and payload["wrt"] == "features"
    assert len(payload["singular_values"]) == 2


def test_explicit_tolerance_counts_above_it(graph):
    model = zoo_model("gcn", "elu")
    default = metamer_dimension(model, graph, 4)
    huge = metamer_dimension(model, graph, 4, tol=float(default.singular_values[0][0]) * 2)
    assert int(huge.rank[0]) == 0 and float(huge.log_volume[0]) == 0.0
    assert int(huge.dimension[0]) == int(huge.input_dim[0])


@pytest.mark.parametrize("name, pool", [("gcn", "mean"), ("gin", "add"), ("gat", "max")])
@pytest.mark.parametrize("wrt", ["features", "edges"])
def test_graph_level_readout_matches_dense(name, pool, wrt):
    """A pooled layer: one target per graph of a batch, J over all of that graph's inputs."""
    graphs = fm.datasets.synthetic_graphs(num_graphs=3, min_nodes=5, max_nodes=9, seed=2)
    batch = Batch.from_data_list(graphs)
    torch.manual_seed(1)
    model = fm.models.build_model(name, 3, 2, hidden=8, depth=2, pool=pool).eval()
    result = metamer_dimension(model, batch, layer="readout", wrt=wrt)
    model64 = copy.deepcopy(model).double()
    x, weight = batch.x.double(), torch.ones(batch.num_edges, dtype=torch.float64)
    if wrt == "edges":
        full = torch.func.jacrev(
            lambda w: layer_output(model64, "readout", x, batch.edge_index, w, batch.batch))(weight)
        owner = batch.batch[batch.edge_index[1]]
    else:
        full = torch.func.jacrev(
            lambda x_: layer_output(model64, "readout", x_, batch.edge_index, None, batch.batch))(x)
        owner = batch.batch
    assert result.nodes is None and result.rank.numel() == 3
    assert_matches_dense(result, [full[b][:, owner == b].reshape(full.shape[1], -1) for b in range(3)])


class _GlobalConv(WeightedGCNConv):
    """A layer that also subtracts the mean over all nodes: not local, so receptive fields
    cannot reproduce it."""

    def forward(self, x, edge_index, edge_weight=None):
        out = super().forward(x, edge_index, edge_weight)
        return out - out.mean(0)


class _GlobalModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _GlobalConv(NUM_FEATURES, 3)

    def forward(self, x, edge_index, edge_weight=None):
        return self.conv(x, edge_index, edge_weight)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"node": NUM_NODES}, ValueError, "out of range"),
    ({"node": []}, ValueError, "empty"),
    ({"node": 1.5}, TypeError, "node must be"),
    ({"wrt": "weights"}, ValueError, "unknown wrt"),
    ({"tol": -1.0}, ValueError, "tol"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"layer": "nope"}, ValueError, "unknown layer"),
])
def test_bad_arguments(graph, kwargs, error, match):
    with pytest.raises(error, match=match):
        metamer_dimension(zoo_model("gcn", "relu"), graph, **kwargs)


def test_bad_graphs_and_models(graph):
    bad = graph.clone()
    bad.x = bad.x.clone()
    bad.x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        metamer_dimension(zoo_model("gcn", "relu"), bad)
    no_edges = Data(x=graph.x, edge_index=torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="no edges"):
        metamer_dimension(zoo_model("gcn", "relu"), no_edges, wrt="edges")
    with pytest.raises(ValueError, match="edge_weight"):
        metamer_dimension(zoo_model("mlp", "relu"), graph, wrt="edges")
    pooled = fm.models.GCN(NUM_FEATURES, 2, hidden=8, pool="mean")
    with pytest.raises(ValueError, match="graph-level"):
        metamer_dimension(pooled, graph, 0, layer="readout")
    with pytest.raises(ValueError, match="graph-level"):
        metamer_dimension(pooled, graph, layer="readout", wrt="self")
    with pytest.raises(ValueError, match="do not reproduce"):
        metamer_dimension(_GlobalModel(), graph, layer="conv")


@pytest.mark.parametrize("wrt, edgeless", [("self", False), ("features", True)])
def test_forward_mode_equals_reverse_mode_and_jacrev(graph, monkeypatch, wrt, edgeless):
    """Where every target has fewer inputs than d_l (wrt="self" with d = 5 < 6 outputs; one-node
    receptive fields of a graph without edges) the Jacobian comes from batched JVPs; it equals
    the batched-VJP path and the dense jacrev."""
    if edgeless:
        graph = Data(x=graph.x, edge_index=torch.zeros(2, 0, dtype=torch.long))
    model = zoo_model("gcn", "elu")
    used = []
    forward = dim_module._jacobian_rows_forward
    monkeypatch.setattr(dim_module, "_jacobian_rows_forward", lambda *a: used.append(1) or forward(*a))
    got = metamer_dimension(model, graph, wrt=wrt)
    assert used, "forward mode was not chosen"
    assert_matches_dense(got, dense_reference(model, graph, None, wrt))
    monkeypatch.setattr(dim_module, "_jacobian_rows_forward",
                        lambda problem, union, targets, owner, passes:
                        dim_module._jacobian_rows_reverse(problem, union, targets, owner.numel()))
    want = metamer_dimension(model, graph, wrt=wrt)
    assert torch.equal(got.rank, want.rank) and torch.equal(got.input_dim, want.input_dim)
    for a, b in zip(got.singular_values, want.singular_values):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_memory_budget_is_validated(graph):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="memory_budget"):
            metamer_dimension(zoo_model("gcn", "relu"), graph, memory_budget=bad)
