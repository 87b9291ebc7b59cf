"""Bad and unusual input at the entry points ``fm.generate`` and ``fm.metamer_dimension`` (SPEC §8):
a clear ValueError / TypeError naming the problem, or, where the input is merely unusual (float64
graphs, int32 edge lists, numpy ids), the same result as the usual input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch_geometric.nn import GCNConv
from torch_geometric.nn.models import GCN

import fastmetamer as fm

STEPS = dict(steps=20, progress=False, scores=False)


@pytest.fixture(scope="module")
def gcn():
    torch.manual_seed(0)
    return GCN(12, 8, num_layers=2, out_channels=3).eval()


def _with(graph, **fields):
    out = graph.clone()
    for key, value in fields.items():
        setattr(out, key, value)
    return out


# --- inputs that simply work ----------------------------------------------------------------------

def test_float64_graph_with_float32_model(graph, gcn):
    plain = fm.generate(gcn, graph, [4, 5], **STEPS)
    wide = fm.generate(gcn, _with(graph, x=graph.x.double()), [4, 5], **STEPS)
    assert torch.equal(wide.loss, plain.loss) and torch.equal(wide.graph.x, plain.graph.x)
    assert wide.input_graph.x.dtype == torch.float64  # the caller's graph is untouched
    dim = fm.metamer_dimension(gcn, _with(graph, x=graph.x.double()), 4)
    assert torch.equal(dim.rank, fm.metamer_dimension(gcn, graph, 4).rank)


def test_int32_edge_index(graph, gcn):
    small = _with(graph, edge_index=graph.edge_index.int())
    assert fm.generate(gcn, small, 4, **STEPS).loss == fm.generate(gcn, graph, 4, **STEPS).loss
    assert small.edge_index.dtype == torch.int32
    assert torch.equal(fm.metamer_dimension(gcn, small, 4).rank, fm.metamer_dimension(gcn, graph, 4).rank)


@pytest.mark.parametrize("node, expected", [
    (np.int64(4), 4), (np.int32(4), 4), (np.array([4, 5]), [4, 5]), ([np.int64(4), np.uint8(5)], [4, 5]),
    (np.array(4), [4]),
])
def test_numpy_node_ids(graph, gcn, node, expected):
    res = fm.generate(gcn, graph, node, **STEPS)
    assert res.nodes == ([expected] if isinstance(expected, int) else expected)
    assert fm.metamer_dimension(gcn, graph, node).nodes.tolist() == res.nodes


# --- clear errors ---------------------------------------------------------------------------------

def test_wrong_feature_width_names_both_widths(graph, gcn):
    narrow = _with(graph, x=graph.x[:, :7])
    with pytest.raises(ValueError, match="7 features per node but the model takes 12"):
        fm.generate(gcn, narrow, 0, **STEPS)
    with pytest.raises(ValueError, match="7 features per node but the model takes 12"):
        fm.generate(gcn, narrow, 0, hops=2, **STEPS)
    with pytest.raises(ValueError, match="7 features per node but the model takes 12"):
        fm.metamer_dimension(gcn, narrow, 0)


def test_wrong_width_without_declared_width(graph):
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 3))
            self.conv = GCNConv(3, 2)  # declares in_channels=3, but the model takes 5

        def forward(self, x, edge_index, edge_weight=None):
            return self.conv(x @ self.weight, edge_index, edge_weight)

    with pytest.raises(ValueError, match="12 features per node"):
        fm.generate(Bare().eval(), graph, 0, layer="conv", **STEPS)


@pytest.mark.parametrize("weight", [-1.0, -1e-6])
def test_negative_edge_weights(graph, gcn, weight):
    w = torch.ones(graph.edge_index.shape[1])
    w[3] = weight
    bad = _with(graph, edge_weight=w)
    with pytest.raises(ValueError, match="negative.*>= 0"):
        fm.generate(gcn, bad, 0, **STEPS)
    with pytest.raises(ValueError, match="negative.*>= 0"):
        fm.metamer_dimension(gcn, bad, 0)


@pytest.mark.parametrize("hops", [-1, 1.5, "2", True])
def test_bad_hops(graph, gcn, hops):
    with pytest.raises(ValueError, match="hops must be None .* int >= 0"):
        fm.generate(gcn, graph, 0, hops=hops, **STEPS)


@pytest.mark.parametrize("node", [np.array([1.0, 2.0]), np.array([True]), [np.float32(1.0)], np.bool_(True)])
def test_non_integer_numpy_ids(graph, gcn, node):
    with pytest.raises(TypeError, match="node"):
        fm.generate(gcn, graph, node, **STEPS)


def test_model_and_graph_on_different_devices(graph):
    meta = GCN(12, 8, num_layers=2, out_channels=3).to("meta")
    with pytest.raises(ValueError, match=r"parameters are on \['meta'\] but graph.x is on cpu"):
        fm.generate(meta, graph, 0, **STEPS)
    with pytest.raises(ValueError, match=r"parameters are on \['meta'\] but graph.x is on cpu"):
        fm.metamer_dimension(meta, graph, 0)


def test_graph_not_modified(graph, gcn):
    before = graph.clone()
    fm.generate(gcn, _with(graph, edge_index=graph.edge_index.int()), 0, **STEPS)
    fm.generate(gcn, graph, 0, **STEPS)
    assert all(torch.equal(before[k], graph[k]) for k in before.keys())


def test_is_binary_is_remembered_until_the_tensor_changes():
    """The answer is cached per tensor, and an in-place edit (directly or through a view) is seen."""
    from fastmetamer.validation import is_binary

    x = torch.zeros(6, 4)
    assert is_binary(x)
    x[0, 0] = 0.5
    assert not is_binary(x)
    x.view(-1)[0] = 1.0
    assert is_binary(x)
    x[2:][0, 1] = 3.0
    assert not is_binary(x)
    assert is_binary(torch.ones(3)) and not is_binary(torch.full((3,), 2.0))
