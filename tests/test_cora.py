"""Acceptance on Cora (skipped without ../shared/data): feature metamers of trained PyG models at
the output layer with default settings are good, pass, are exactly binary and far from the input."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.nn import models

import fastmetamer as fm
from fastmetamer.graph.layers import layer_output

from conftest import train_node_classifier

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def cora(shared_data):
    return fm.datasets.load("Cora", root=shared_data)


@pytest.mark.parametrize("name, options", [("GCN", dict(num_layers=2)), ("GIN", dict(num_layers=2)),
                                           ("GraphSAGE", dict(num_layers=3, act="elu"))])
def test_feature_metamers_on_cora(cora, name, options):
    torch.manual_seed(0)
    model = train_node_classifier(getattr(models, name)(cora.num_features, 64, out_channels=7, **options),
                                  cora, epochs=100)
    # low-degree test nodes keep the 3-hop GraphSAGE receptive fields small enough for CI
    degree = torch.bincount(cora.edge_index[1], minlength=cora.num_nodes)
    nodes = [v for v in cora.test_mask.nonzero().flatten().tolist() if degree[v] <= 2][:2]
    res = fm.generate(model, cora, nodes, progress=False)
    assert (res.loss < 1e-2).all() and res.passed.all()
    free = res.graph.free_mask
    assert set(res.graph.x[free].unique().tolist()) <= {0.0, 1.0}
    for c in range(len(nodes)):
        rows = free & (res.graph.batch == c)
        assert res.graph.x[rows].sum() == res.reference.x[rows].sum()
    assert max(res.metrics["features"]["cosine"]) < 0.5
    with torch.no_grad():
        meta = layer_output(model, res.layer, res.graph.x, res.graph.edge_index)[res.center]
        ref = layer_output(model, res.layer, res.reference.x, res.reference.edge_index)[res.center]
        full = model(cora.x, cora.edge_index)[nodes]
    torch.testing.assert_close(ref, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((meta - ref).pow(2).sum(1) / ref.pow(2).sum(1), res.loss, rtol=1e-3, atol=1e-7)
