"""Exact receptive-field extraction.

H^l[v] of an l'-hop model depends only on nodes within l' hops of v (the *receptive field* R),
but an induced l'-hop subgraph is not exact: GCN-style normalisation needs the true degree of
the outermost ring, whose edges come from ring l'+1. We therefore keep every edge whose
destination lies in R (so every node of R keeps its full in-degree), which pulls in ring l'+1
as frozen *boundary* nodes. Edges into boundary nodes are dropped: whatever boundary nodes
compute cannot reach the targets within l' hops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric.utils import k_hop_subgraph


@dataclass
class Subgraph:
    """The graph one metamer problem works on (a receptive field, a disjoint union, or all).

    Attributes:
        x: node features [m, d].
        edge_index: edges [2, E] in local ids (source, destination).
        edge_weight: edge weights [E] or None.
        node_ids: original id of every local node [m].
        free: [m] bool, True for nodes within the receptive field (optimisable).
        component: [m] long, which target's copy a node belongs to (all 0 for a shared graph).
        center: [T] local ids of the target nodes (all nodes for a whole-graph problem).
        num_components: number of independent problems C.
        pool_batch: [m] graph id of every node, passed as ``batch`` to a pooled (graph-level)
            layer so that each graph of a batch is pooled on its own (None: one graph).
    """

    x: Tensor
    edge_index: Tensor
    edge_weight: Tensor | None
    node_ids: Tensor
    free: Tensor
    component: Tensor
    center: Tensor
    num_components: int
    pool_batch: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    def free_ptr(self) -> Tensor:
        """[C + 1] offsets: the free rows of component c are ``free_ptr[c]:free_ptr[c+1]``
        of ``x[free]`` (free nodes come first within each component, components in order)."""
        counts = torch.bincount(self.component[self.free], minlength=self.num_components)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def whole_graph(x: Tensor, edge_index: Tensor, edge_weight: Tensor | None,
                batch: Tensor | None = None) -> Subgraph:
    """The whole graph as one problem: every node free and a target. With ``batch`` [n] (graph
    id of every node, as in a PyG ``Batch``), one independent problem per graph, each pooled on
    its own by a graph-level layer."""
    n = x.shape[0]
    if batch is None:
        return Subgraph(x, edge_index, edge_weight, torch.arange(n), torch.ones(n, dtype=torch.bool),
                        torch.zeros(n, dtype=torch.long), torch.arange(n), 1)
    num_graphs = check_graph_ids(batch, n)
    return Subgraph(x, edge_index, edge_weight, torch.arange(n), torch.ones(n, dtype=torch.bool),
                    batch, torch.arange(n), num_graphs, pool_batch=batch)


def check_graph_ids(batch: Tensor, n: int) -> int:
    """Validate a ``batch`` vector (graph ids 0..G-1, sorted, every graph non-empty); returns G."""
    if batch.dtype != torch.long or batch.shape != (n,):
        raise ValueError(f"graph.batch must be a long tensor [num_nodes={n}], got {batch.dtype} "
                         f"{tuple(batch.shape)}")
    if n == 0:
        raise ValueError("graph.batch is empty: the batch has no nodes")
    counts = torch.bincount(batch) if int(batch.min()) >= 0 else None
    if counts is None or bool((batch[1:] < batch[:-1]).any()) or bool((counts == 0).any()):
        raise ValueError("graph.batch must hold sorted graph ids 0..G-1 with every graph non-empty "
                         "(as torch_geometric.data.Batch.from_data_list makes it)")
    return counts.numel()


def receptive_field(x: Tensor, edge_index: Tensor, edge_weight: Tensor | None,
                    targets: Tensor, hops: int) -> Subgraph:
    """One shared subgraph holding the receptive fields of all ``targets`` [T].

    Local order: the nodes of R (free) first, then the boundary ring; targets are looked up.
    """
    n = x.shape[0]
    inner, _, _, _ = k_hop_subgraph(targets, hops, edge_index, num_nodes=n)
    outer, _, _, _ = k_hop_subgraph(targets, hops + 1, edge_index, num_nodes=n)
    inner_mask = torch.zeros(n, dtype=torch.bool)
    inner_mask[inner] = True
    boundary = outer[~inner_mask[outer]]
    nodes = torch.cat([inner, boundary])
    local = torch.full((n,), -1, dtype=torch.long)
    local[nodes] = torch.arange(nodes.numel())
    keep = inner_mask[edge_index[1]]
    sub_edges = local[edge_index[:, keep]]
    sub_weight = edge_weight[keep] if edge_weight is not None else None
    free = torch.zeros(nodes.numel(), dtype=torch.bool)
    free[: inner.numel()] = True
    return Subgraph(x[nodes], sub_edges, sub_weight, nodes, free,
                    torch.zeros(nodes.numel(), dtype=torch.long), local[targets], 1)


def disjoint_receptive_fields(x: Tensor, edge_index: Tensor, edge_weight: Tensor | None,
                              targets: Tensor, hops: int) -> Subgraph:
    """A disjoint union with one private copy of each target's receptive field (like a PyG
    mini-batch), so the targets are independent problems solved in the same steps."""
    parts = [receptive_field(x, edge_index, edge_weight, t.view(1), hops) for t in targets]
    offsets = torch.tensor([0] + [p.num_nodes for p in parts]).cumsum(0)
    return Subgraph(
        x=torch.cat([p.x for p in parts]),
        edge_index=torch.cat([p.edge_index + o for p, o in zip(parts, offsets)], dim=1),
        edge_weight=None if edge_weight is None else torch.cat([p.edge_weight for p in parts]),
        node_ids=torch.cat([p.node_ids for p in parts]),
        free=torch.cat([p.free for p in parts]),
        component=torch.cat([torch.full((p.num_nodes,), c) for c, p in enumerate(parts)]),
        center=torch.cat([p.center + o for p, o in zip(parts, offsets)]),
        num_components=len(parts),
    )
