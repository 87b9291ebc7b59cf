"""What a PyG user expects of the API (SPEC §8): ``res.to_full_graph()``, ``edge_weight`` by
keyword, ``forward_kwargs=`` for extra forward arguments, and one rule for scalars vs per-target
tensors in a result."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch_geometric.nn import GCNConv, GINEConv, MeanAggregation

import fastmetamer as fm
from fastmetamer.graph.layers import call_model, layer_output

from conftest import awkward_graph

STEPS = dict(steps=30, progress=False, scores=False)


@pytest.fixture(scope="module")
def zoo_gcn():
    torch.manual_seed(0)
    return fm.models.GCN(12, 3, hidden=8, depth=2).eval()


def _acts(model, layer, data, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return layer_output(model, layer, data.x.float(), data.edge_index, getattr(data, "edge_weight", None),
                            **kwargs)


def _overlapping(graph) -> tuple[int, int]:
    """Two nodes joined by an edge (their receptive fields overlap)."""
    src, dst = graph.edge_index[:, graph.edge_index[0] != graph.edge_index[1]][:, 0].tolist()
    return src, dst


# --- to_full_graph ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["features", "structure", "joint"])
def test_full_graph_reproduces_metamer_activation(graph, zoo_gcn, kind):
    res = fm.generate(zoo_gcn, graph, 4, kind=kind, **STEPS)
    full = res.to_full_graph()
    assert full.num_nodes == graph.num_nodes
    assert torch.equal(full.x, graph.x) == (kind == "structure")
    expected = _acts(zoo_gcn, res.layer, res.graph)[res.center]
    assert torch.allclose(_acts(zoo_gcn, res.layer, full)[4], expected, atol=1e-5)
    if kind == "features":
        assert torch.equal(full.edge_index, graph.edge_index)
    outside = torch.ones(graph.num_nodes, dtype=torch.bool)
    outside[res.graph.n_id[res.graph.free_mask]] = False
    assert torch.equal(full.x[outside], graph.x[outside]) and torch.equal(full.y, graph.y)


def test_full_graph_several_targets(graph, zoo_gcn):
    a, b = _overlapping(graph)
    res = fm.generate(zoo_gcn, graph, [a, b, 39], **STEPS)  # node 39 is isolated
    with pytest.raises(ValueError, match="overlap"):
        res.to_full_graph()
    for t, node in enumerate(res.nodes):
        full = res.to_full_graph(target=t)
        expected = _acts(zoo_gcn, res.layer, res.graph)[res.center[t]]
        assert torch.allclose(_acts(zoo_gcn, res.layer, full)[node], expected, atol=1e-5)
    apart = fm.generate(zoo_gcn, graph, [a, 39], **STEPS)
    full = apart.to_full_graph()
    acts = _acts(zoo_gcn, apart.layer, apart.graph)[apart.center]
    assert torch.allclose(_acts(zoo_gcn, apart.layer, full)[[a, 39]], acts, atol=1e-5)
    with pytest.raises(ValueError, match="target must be"):
        apart.to_full_graph(target=2)


def test_full_graph_of_whole_graph_metamer_is_the_metamer(graph, zoo_gcn):
    res = fm.generate(zoo_gcn, graph, None, **STEPS)
    assert res.to_full_graph() is res.graph


def test_full_graph_keeps_dtype_and_needs_graph_after_load(tmp_path, graph, zoo_gcn):
    wide = graph.clone()
    wide.x = wide.x.double()
    res = fm.generate(zoo_gcn, wide, 4, **STEPS)
    assert res.input_graph is wide and res.to_full_graph().x.dtype == torch.float64
    res.save(tmp_path / "r.pt")
    assert "input_graph" not in torch.load(tmp_path / "r.pt", weights_only=False)
    loaded = fm.MetamerResult.load(tmp_path / "r.pt")
    with pytest.raises(ValueError, match="pass it"):
        loaded.to_full_graph()
    assert torch.equal(loaded.to_full_graph(wide).x, res.to_full_graph().x)
    with pytest.raises(ValueError, match="not the graph"):
        loaded.to_full_graph(awkward_graph(num_nodes=40, num_features=5))


# --- edge_weight by keyword --------------------------------------------------------------------------

class KeywordOnly(nn.Module):
    """A model whose ``edge_weight`` can only be given by keyword."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = GCNConv(12, 8), GCNConv(8, 3)

    def forward(self, x, edge_index, *, edge_weight=None):
        return self.conv2(self.conv1(x, edge_index, edge_weight).relu(), edge_index, edge_weight)


def test_call_model_passes_edge_weight_by_keyword_or_position():
    seen = {}

    class Positional(nn.Module):
        def forward(self, x, edge_index, w=None):
            seen["w"] = w

    weight = torch.ones(3)
    call_model(Positional(), torch.zeros(2, 1), torch.zeros(2, 3, dtype=torch.long), weight)
    assert seen["w"] is weight
    torch.manual_seed(0)
    model = KeywordOnly()
    x, edges = torch.randn(3, 12), torch.tensor([[0, 1, 2], [1, 2, 0]])
    assert torch.equal(call_model(model, x, edges, weight * 2), model(x, edges, edge_weight=weight * 2))


def test_keyword_only_edge_weight_model_gets_structure_metamers(graph):
    torch.manual_seed(0)
    model = KeywordOnly().eval()
    weighted = graph.clone()
    weighted.edge_weight = torch.rand(graph.edge_index.shape[1]) + 0.5
    res = fm.generate(model, weighted, 4, kind="structure", **STEPS)
    assert res.graph.edge_weight is not None and res.loss < 1.0


# --- forward_kwargs --------------------------------------------------------------------------------

class EdgeAttrNet(nn.Module):
    """Two GINE layers that read per-edge features ``edge_attr`` [E, 4] and a per-node
    ``scale`` [n, 1]."""

    def __init__(self):
        super().__init__()
        self.conv1 = GINEConv(nn.Linear(12, 8), edge_dim=4)
        self.conv2 = GINEConv(nn.Linear(8, 3), edge_dim=4)

    def forward(self, x, edge_index, edge_attr, scale=None):
        x = x if scale is None else x * scale
        return self.conv2(self.conv1(x, edge_index, edge_attr).relu(), edge_index, edge_attr)


@pytest.fixture(scope="module")
def edge_model(graph):
    torch.manual_seed(0)
    extra = {"edge_attr": torch.randn(graph.edge_index.shape[1], 4), "scale": torch.rand(graph.num_nodes, 1)}
    return EdgeAttrNet().eval(), extra


def test_forward_kwargs_reach_every_call_and_follow_the_subgraph(graph, edge_model):
    model, extra = edge_model
    a, b = _overlapping(graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fast engine (if built) falls back with a warning
        res = fm.generate(model, graph, [a, b], forward_kwargs=extra, **STEPS)  # exactness is checked inside
    assert res.settings["forward_kwargs"] == ["edge_attr", "scale"] and res.settings["backend"] == "reference"
    reference = _acts(model, res.layer, graph, forward_kwargs=extra)
    for t, node in enumerate(res.nodes):
        moved = _acts(model, res.layer, res.to_full_graph(target=t), forward_kwargs=extra)[node]
        assert torch.allclose((moved - reference[node]).norm(), res.distance[t], rtol=1e-4, atol=1e-6)
    whole = fm.generate(model, graph, None, forward_kwargs=extra, **STEPS)
    assert whole.loss < 1.0


def test_forward_kwargs_errors(graph, edge_model, zoo_gcn):
    model, extra = edge_model
    with pytest.raises(ValueError, match="per-edge.*kind='features'"):
        fm.generate(model, graph, 4, kind="structure", forward_kwargs=extra, **STEPS)
    with pytest.raises(ValueError, match="may not set"):
        fm.generate(zoo_gcn, graph, 4, forward_kwargs={"edge_weight": None}, **STEPS)
    with pytest.raises(TypeError, match="forward_kwargs must be a dict"):
        fm.generate(zoo_gcn, graph, 4, forward_kwargs=[1], **STEPS)
    with pytest.raises(ValueError, match=r"\['edge_attr'\] are not on graph.x's device"):
        fm.generate(model, graph, 4, forward_kwargs={**extra, "edge_attr": extra["edge_attr"].to("meta")},
                    **STEPS)
    with pytest.raises(ValueError, match="two-node probe graph"):  # edge_attr of the wrong length
        fm.generate(model, graph, 4, forward_kwargs={"edge_attr": extra["edge_attr"][:-1]}, **STEPS)


def test_forward_kwargs_for_null_graphs_come_from_their_attributes():
    torch.manual_seed(0)
    graphs = [awkward_graph(num_nodes=12, num_features=12, seed=s) for s in range(3)]
    for g in graphs:
        g.edge_attr = torch.randn(g.edge_index.shape[1], 4)

    class Pooled(EdgeAttrNet):
        def __init__(self):
            super().__init__()
            self.readout = MeanAggregation()

        def forward(self, x, edge_index, edge_attr, batch=None):
            return self.readout(super().forward(x, edge_index, edge_attr), batch)

    model = Pooled().eval()
    extra = {"edge_attr": graphs[0].edge_attr}
    res = fm.generate(model, graphs[0], None, layer="readout", forward_kwargs=extra, null_graphs=graphs[1:],
                      **STEPS)
    assert res.null_threshold.isfinite().all() and res.loss < 1.0
    for g in graphs[1:]:
        del g.edge_attr
    with pytest.raises(ValueError, match="must carry them"):
        fm.generate(model, graphs[0], None, layer="readout", forward_kwargs=extra, null_graphs=graphs[1:],
                    **STEPS)


# --- scalars or tensors ----------------------------------------------------------------------------

def test_scalar_or_tensor_rule(graph, zoo_gcn):
    one = fm.generate(zoo_gcn, graph, 4, **STEPS)
    assert isinstance(one.loss, float) and isinstance(one.passed, bool) and isinstance(one.center, int)
    assert isinstance(one.trivial, bool) and one.history.dim() == 1 and one.distance.shape == (1,)
    listed = fm.generate(zoo_gcn, graph, [4], **STEPS)
    assert listed.loss == one.loss and listed.passed == one.passed and listed.center == one.center
    many = fm.generate(zoo_gcn, graph, [4, 5], **STEPS)
    for value in (many.loss, many.passed, many.center, many.trivial, many.distance):
        assert isinstance(value, torch.Tensor) and value.shape == (2,)
    assert many.history.shape[1] == 2
    whole = fm.generate(zoo_gcn, graph, None, **STEPS)
    assert isinstance(whole.loss, float) and whole.history.dim() == 1
    for value in (whole.passed, whole.center, whole.trivial, whole.distance):
        assert isinstance(value, torch.Tensor) and value.shape == (graph.num_nodes,)


def test_crossarch_judges_the_metamer_in_the_full_graph(graph, zoo_gcn):
    from fastmetamer.study.crossarch import _node_judgements

    res = fm.generate(zoo_gcn, graph, [4, 5], **STEPS)
    res.input_graph = None  # as loaded from a study folder
    classes, reference, labels = _node_judgements(zoo_gcn, {"results": [res], "targets": [4, 5]}, graph)
    for t, node in enumerate([4, 5]):  # by hand: the target's receptive field's features replaced
        rows = (res.graph.batch == t) & res.graph.free_mask
        x = graph.x.clone()
        x[res.graph.n_id[rows]] = res.graph.x[rows]
        assert classes[t] == int(zoo_gcn(x, graph.edge_index)[node].argmax())
    assert reference == zoo_gcn(graph.x, graph.edge_index).argmax(1)[[4, 5]].tolist()
    assert labels == graph.y[[4, 5]].tolist()
