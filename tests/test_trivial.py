"""Trivial targets (SPEC §2.3): a metamer that cannot differ from its reference, or comes back
unchanged, claims nothing; it is flagged, never passes, and gets no consistency score."""
from __future__ import annotations

import math

import torch
from torch_geometric.data import Data

import fastmetamer as fm


def _with_islands(graph: Data) -> tuple[Data, int, int]:
    """``graph`` plus an isolated all-zero node and a separate triangle (every pair of the
    triangle is an edge: no free slot for a structure metamer). Returns the graph, the isolated
    node's id and a triangle node's id."""
    n, d = graph.num_nodes, graph.num_features
    tri = torch.tensor([[0, 1], [1, 2], [0, 2]]) + n + 1
    extra = torch.cat([tri, tri.flip(1)]).t()
    x = torch.cat([graph.x, torch.zeros(1, d), graph.x[:3]])
    return Data(x=x, edge_index=torch.cat([graph.edge_index, extra], dim=1)), n, n + 1


def test_isolated_all_zero_node_is_trivial_and_never_passes(synthetic, pyg_gcn):
    graph, isolated, _ = _with_islands(synthetic)
    node = int(synthetic.test_mask.nonzero()[0])
    res = fm.generate(pyg_gcn, graph, [isolated, node], steps=100, progress=False)
    assert res.trivial.tolist() == [True, False]
    assert not res.passed[0]
    assert torch.equal(res.graph.x[res.graph.batch == 0], res.reference.x[res.reference.batch == 0])
    assert math.isnan(res.metrics["consistency"]["consistency"][0])
    assert res.passed[1] and not math.isnan(res.metrics["consistency"]["consistency"][1])
    single = fm.generate(pyg_gcn, graph, isolated, steps=20, progress=False)
    assert single.trivial is True and single.passed is False
    assert single.to_dict()["trivial"] is True


def test_structure_target_without_a_free_slot_is_trivial(synthetic, pyg_gcn):
    graph, _, triangle = _with_islands(synthetic)
    node = int(synthetic.test_mask.nonzero()[0])
    res = fm.generate(pyg_gcn, graph, [triangle, node], kind="structure", steps=100, progress=False)
    assert res.trivial.tolist() == [True, False]
    assert not res.passed[0]
    assert math.isnan(res.metrics["consistency"]["consistency"][0])
    assert res.metrics["structure"]["edge_jaccard"][1] < 1.0
