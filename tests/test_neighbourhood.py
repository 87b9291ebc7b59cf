"""Vectorised receptive fields (one frontier expansion over the cached in-edge CSR) against the
per-target oracle: PyG's ``k_hop_subgraph`` for the field, its context and its boundary ring."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st
from torch_geometric.utils import k_hop_subgraph

from conftest import awkward_graph
from fastmetamer.graph import neighbourhood
from fastmetamer.graph.subgraph import disjoint_receptive_fields, receptive_field


def oracle_field(x, edge_index, edge_weight, targets, hops, context):
    """Receptive field of ``targets`` (one shared problem) from three ``k_hop_subgraph`` calls:
    (nodes in local order, free mask, local edges, edge ids, weights, local targets)."""
    n = x.shape[0]
    field = k_hop_subgraph(targets, hops, edge_index, num_nodes=n)[0]
    inner = k_hop_subgraph(targets, hops + context, edge_index, num_nodes=n)[0]
    outer = k_hop_subgraph(targets, hops + context + 1, edge_index, num_nodes=n)[0]
    in_field, in_inner = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    in_field[field], in_inner[inner] = True, True
    nodes = torch.cat([field, inner[~in_field[inner]], outer[~in_inner[outer]]])
    local = torch.full((n,), -1)
    local[nodes] = torch.arange(nodes.numel())
    keep = in_inner[edge_index[1]]
    free = torch.arange(nodes.numel()) < field.numel()
    weight = None if edge_weight is None else edge_weight[keep]
    return nodes, free, local[edge_index[:, keep]], keep.nonzero().flatten(), weight, local[targets]


def assert_same(sub, expected, component=0):
    nodes, free, edges, edge_ids, weight, center = expected
    mine = sub.component == component
    offset = int(mine.nonzero()[0]) if mine.any() else 0
    assert torch.equal(sub.node_ids[mine], nodes)
    assert torch.equal(sub.free[mine], free)
    own_edges = sub.component[sub.edge_index[1]] == component
    assert torch.equal(sub.edge_index[:, own_edges] - offset, edges)
    assert torch.equal(sub.edge_ids[own_edges], edge_ids)
    if weight is not None:
        assert torch.equal(sub.edge_weight[own_edges], weight)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), hops=st.integers(1, 3), context=st.integers(0, 2),
       count=st.integers(1, 5), weighted=st.booleans())
def test_receptive_fields_equal_k_hop_subgraph(seed, n, hops, context, count, weighted):
    """Shared and disjoint fields equal the per-target oracle on awkward graphs (isolated nodes,
    self loops, duplicate edges, a hub; one node; no edges)."""
    gen = torch.Generator().manual_seed(seed)
    graph = awkward_graph(num_nodes=max(n, 4), num_features=3, seed=seed) if n > 3 else None
    if graph is None:  # 1-3 nodes, perhaps no edge at all
        x = torch.randn(n, 3, generator=gen)
        edge_index = torch.randint(0, n, (2, int(torch.randint(0, 3, (1,), generator=gen))), generator=gen)
    else:
        x, edge_index = graph.x, graph.edge_index
        n = x.shape[0]
    weight = torch.rand(edge_index.shape[1], generator=gen) if weighted else None
    targets = torch.randint(0, n, (count,), generator=gen)

    shared = receptive_field(x, edge_index, weight, targets, hops, context=context)
    expected = oracle_field(x, edge_index, weight, targets, hops, context)
    assert_same(shared, expected)
    assert torch.equal(shared.center, expected[5]) and shared.num_components == 1
    assert torch.equal(shared.x, x[shared.node_ids])

    union = disjoint_receptive_fields(x, edge_index, weight, targets, hops, context=context)
    assert union.num_components == count
    for c, t in enumerate(targets.tolist()):
        expected = oracle_field(x, edge_index, weight, torch.tensor([t]), hops, context)
        assert_same(union, expected, component=c)
        assert int(union.node_ids[union.center[c]]) == t and int(union.component[union.center[c]]) == c
    assert torch.equal(union.x, x[union.node_ids])
    assert bool((union.component[1:] >= union.component[:-1]).all())


def test_in_edge_csr_is_cached_per_tensor_and_rebuilt_after_an_edit():
    edge_index = torch.tensor([[0, 1, 2, 2], [1, 2, 0, 1]])
    first = neighbourhood.in_edges(edge_index, 3)
    assert neighbourhood.in_edges(edge_index, 3) is first
    assert torch.equal(first.rowptr, torch.tensor([0, 1, 3, 4]))
    assert torch.equal(first.source, torch.tensor([2, 0, 2, 1])) and torch.equal(first.edge_id, torch.tensor([2, 0, 3, 1]))
    edge_index[0, 0] = 2  # in place: the cached CSR is stale
    rebuilt = neighbourhood.in_edges(edge_index, 3)
    assert rebuilt is not first and torch.equal(rebuilt.source, torch.tensor([2, 2, 2, 1]))
    assert neighbourhood.in_edges(edge_index, 4) is not rebuilt
    key = id(edge_index)
    del edge_index
    assert key not in neighbourhood._CACHE


def test_rings_cost_follows_the_rings_not_the_graph():
    """A target in a small component of a large graph only touches that component's entries."""
    chain = torch.tensor([[0, 1, 2], [1, 2, 3]])
    rest = torch.randint(10, 100_000, (2, 200_000), generator=torch.Generator().manual_seed(0))
    csr = neighbourhood.in_edges(torch.cat([chain, rest], dim=1), 100_000)
    touched = []
    entries = csr.entries
    csr_spy = neighbourhood.InEdges(csr.num_nodes, csr.rowptr, csr.source, csr.edge_id)
    object.__setattr__(csr_spy, "entries", lambda nodes: touched.append(nodes.numel()) or entries(nodes))
    found = neighbourhood.rings(csr_spy, torch.tensor([3]), torch.zeros(1, dtype=torch.long), 5)
    assert found.node.tolist() == [0, 1, 2, 3] and found.hop.tolist() == [3, 2, 1, 0]
    assert sum(touched) == 4  # the frontiers 3, 2, 1, 0; nothing of the other 200k edges


@settings(deadline=None, max_examples=25, derandomize=True)
@given(n=st.integers(1, 30), seed=st.integers(0, 2**16), stacked=st.booleans(), transpose=st.booleans())
def test_operator_pattern_from_in_edges_equals_the_sorted_one(n, seed, stacked, transpose):
    """An operator's pattern built from the cached in-edge CSR (no sort) is the one a stable sort
    of its coordinates gives: edges then one entry per node, on graphs with isolated nodes, self
    loops, duplicates, a hub, one node or no edges; columns stacked [A | I] or not."""
    from fastmetamer.engines.csr import Pattern

    graph = awkward_graph(num_nodes=n, num_features=2, seed=seed) if n > 3 else None
    edge_index = graph.edge_index if graph is not None else torch.randint(0, n, (2, seed % 3 * n))
    loops = torch.arange(n)
    row = torch.cat([edge_index[1], loops])
    col = torch.cat([edge_index[0], loops + (n if stacked else 0)])
    num_cols = 2 * n if stacked else n
    got = Pattern.from_in_edges(neighbourhood.in_edges(edge_index, n), col[edge_index.shape[1]:], num_cols,
                                (row, col) if transpose else None)
    want = Pattern.from_coo(row, col, n, num_cols, transpose)
    for field in ("rowptr", "col", "order", "t_rowptr", "t_col", "t_order"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None and b is None) or torch.equal(a, b), field
