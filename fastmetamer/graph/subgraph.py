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
from .kwargs import ForwardKwargs
from .neighbourhood import in_edges, rings


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
        edge_ids: [E] original id (column of the graph's ``edge_index``) of every edge.
        forward_kwargs: extra keyword arguments of the model's forward for this graph (per-node
            and per-edge tensors taken for its nodes and edges), or None.
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
    edge_ids: Tensor | None = None
    forward_kwargs: dict | None = None

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    def free_ptr(self) -> Tensor:
        """[C + 1] offsets: the free rows of component c are ``free_ptr[c]:free_ptr[c+1]``
        of ``x[free]`` (free nodes come first within each component, components in order)."""
        counts = torch.bincount(self.component[self.free], minlength=self.num_components)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


    def select_components(self, ids: Tensor) -> "Subgraph":
        """Problems ``ids`` [K] (ascending) alone, as components 0 .. K-1: their nodes and targets
        in order, the edges among their nodes. For disjoint problems (each edge and target
        inside one component) without pooling or extra forward arguments."""
        if self.pool_batch is not None or self.forward_kwargs:
            raise ValueError("select_components needs problems without pooling or extra forward arguments")
        position = torch.full((self.num_components,), -1, dtype=torch.long, device=ids.device)
        position[ids] = torch.arange(ids.numel(), device=ids.device)
        component = position[self.component]
        keep = component >= 0
        local = torch.cumsum(keep, 0) - 1
        edges = keep[self.edge_index[0]] & keep[self.edge_index[1]]
        centers = self.center[keep[self.center]]
        return Subgraph(self.x[keep], local[self.edge_index[:, edges]],
                        None if self.edge_weight is None else self.edge_weight[edges], self.node_ids[keep],
                        self.free[keep], component[keep], local[centers], ids.numel(),
                        edge_ids=None if self.edge_ids is None else self.edge_ids[edges])


def whole_graph(x: Tensor, edge_index: Tensor, edge_weight: Tensor | None,
                batch: Tensor | None = None, forward_kwargs: ForwardKwargs | None = None) -> Subgraph:
    """The whole graph as one problem: every node free and a target. With ``batch`` [n] (graph
    id of every node, as in a PyG ``Batch``), one independent problem per graph, each pooled on
    its own by a graph-level layer. ``forward_kwargs``: the model's extra arguments (whole)."""
    n, device = x.shape[0], x.device
    edge_ids, nodes = torch.arange(edge_index.shape[1], device=device), torch.arange(n, device=device)
    extra = None if forward_kwargs is None else forward_kwargs.as_dict()
    free = torch.ones(n, dtype=torch.bool, device=device)
    if batch is None:
        return Subgraph(x, edge_index, edge_weight, nodes, free, torch.zeros(n, dtype=torch.long, device=device),
                        nodes, 1, edge_ids=edge_ids, forward_kwargs=extra)
    num_graphs = check_graph_ids(batch, n)
    return Subgraph(x, edge_index, edge_weight, nodes, free, batch, nodes, num_graphs, pool_batch=batch, edge_ids=edge_ids,
                    forward_kwargs=extra)


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


def receptive_field(x: Tensor, edge_index: Tensor, edge_weight: Tensor | None, targets: Tensor, hops: int,
                    forward_kwargs: ForwardKwargs | None = None, context: int = 0) -> Subgraph:
    """One shared subgraph holding the receptive fields of all ``targets`` [T].

    Local order: the nodes of R (free) first, then the context, then the boundary ring, each by
    node id; targets are looked up. ``context``: hops beyond R whose nodes are kept, frozen, with
    their true degrees. A metamer that rewires the edges among R can bring any node of R next to
    a target, and with it the nodes up to ``hops - 1`` beyond R: structure and joint metamers need
    ``context = hops - 1`` for the subgraph to give the activation the full graph gives.
    ``forward_kwargs``: the model's extra arguments, sliced to the subgraph's nodes and edges.
    Edges keep the graph's order. Cost: proportional to the edges into R and its context (see
    :func:`~fastmetamer.graph.neighbourhood.rings`), plus the graph's in-edge CSR once.
    """
    targets = targets.to(edge_index.device)
    return _fields(x, edge_index, edge_weight, targets, torch.zeros_like(targets), 1, hops, context,
                   forward_kwargs)


def disjoint_receptive_fields(x: Tensor, edge_index: Tensor, edge_weight: Tensor | None, targets: Tensor,
                              hops: int, forward_kwargs: ForwardKwargs | None = None,
                              context: int = 0) -> Subgraph:
    """A disjoint union with one private copy of each target's receptive field (like a PyG
    mini-batch), so the targets are independent problems solved in the same steps (arguments as
    :func:`receptive_field`; copy c is target c's, laid out as :func:`receptive_field` lays out
    a single target's). All copies come from one vectorised frontier expansion."""
    targets = targets.to(edge_index.device)
    group = torch.arange(targets.numel(), device=targets.device)
    return _fields(x, edge_index, edge_weight, targets, group, targets.numel(), hops, context, forward_kwargs)


#: Ring of a node of a receptive field: inside R, in the frozen context, or on the boundary.
FIELD, CONTEXT, BOUNDARY = 0, 1, 2


def _fields(x: Tensor, edge_index: Tensor, edge_weight: Tensor | None, targets: Tensor, group: Tensor,
            num_groups: int, hops: int, context: int, forward_kwargs: ForwardKwargs | None) -> Subgraph:
    """The disjoint union over groups of the receptive fields of each group's targets."""
    n, num_edges = x.shape[0], edge_index.shape[1]
    csr = in_edges(edge_index, n)
    found = rings(csr, targets, group, hops + context + 1)
    ring = (found.hop > hops).long() + (found.hop > hops + context).long()
    order = torch.argsort((found.group * 3 + ring) * n + found.node)
    position = torch.empty_like(order)  # local id of every found (group, node) pair
    position[order] = torch.arange(order.numel(), device=order.device)
    keys = found.group * n + found.node  # ascending: lookups by binary search
    inner = (ring < BOUNDARY).nonzero().flatten()
    owner, entry = csr.entries(found.node[inner])
    into = inner[owner]
    edge_group, edge_ids = found.group[into], csr.edge_id[entry]
    source = torch.searchsorted(keys, edge_group * n + csr.source[entry])
    by_edge = torch.argsort(edge_group * num_edges + edge_ids)
    edge_ids = edge_ids[by_edge]
    node_ids = found.node[order]
    return Subgraph(
        x=x[node_ids],
        edge_index=torch.stack([position[source], position[into]])[:, by_edge],
        edge_weight=None if edge_weight is None else edge_weight[edge_ids],
        node_ids=node_ids,
        free=ring[order] == FIELD,
        component=found.group[order],
        center=position[torch.searchsorted(keys, group * n + targets)],
        num_components=num_groups,
        edge_ids=edge_ids,
        forward_kwargs=None if forward_kwargs is None else forward_kwargs.take(node_ids, edge_ids),
    )
