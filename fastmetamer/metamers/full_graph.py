"""Putting node metamers back into the full graph they came from (``MetamerResult.to_full_graph``).

A node target's activation depends only on the features of its receptive field R and on the
edges whose destination lies in R (the extracted subgraph holds exactly those). Putting a metamer
in therefore replaces the rows of R in ``x`` and, for structure and joint metamers, every edge
into R; the model then gives the target the metamer's activation in the full graph too. Targets
whose receptive fields are disjoint can be put in together; overlapping ones cannot.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch_geometric.data import Data


def put_in(metamer: Data, kind: str, graph: Data, components: list[int]) -> Data:
    """``graph`` with the receptive fields of ``components`` (target indices into ``metamer``, a
    result's ``graph``) replaced by the metamer's; a shallow copy, ``graph`` is not modified.

    ``x`` keeps ``graph.x``'s dtype and device; for ``kind`` ``"structure"`` / ``"joint"`` the edges
    into R are the metamer's (``edge_weight`` [E'] kept when either graph has weights, ones
    elsewhere)."""
    _check_source(metamer, graph)
    device = graph.x.device
    rows = torch.isin(metamer.batch, torch.tensor(components, device=metamer.batch.device)) & metamer.free_mask
    field = _distinct_field(metamer, rows, components).to(device)
    out = copy.copy(graph)
    out.x = graph.x.clone()
    out.x[field] = metamer.x[rows].to(device=device, dtype=graph.x.dtype)
    if kind in ("structure", "joint"):
        out.edge_index, weight = _edges_into(metamer, rows, graph, field)
        if weight is not None:
            out.edge_weight = weight
    return out


def _check_source(metamer: Data, graph: Data) -> None:
    if not isinstance(graph, Data):
        raise TypeError(f"graph must be a torch_geometric.data.Data, got {type(graph).__name__}")
    if graph.x.shape[1] != metamer.x.shape[1] or int(metamer.n_id.max()) >= graph.num_nodes:
        raise ValueError(f"graph ({graph.num_nodes} nodes, {graph.x.shape[1]} features) is not the "
                         f"graph this metamer was made from ({metamer.x.shape[1]} features, node ids "
                         f"up to {int(metamer.n_id.max())})")


def _distinct_field(metamer: Data, rows: Tensor, components: list[int]) -> Tensor:
    """Original ids [|R|] of the chosen receptive fields; ValueError when two of them overlap."""
    field = metamer.n_id[rows]
    unique, counts = torch.unique(field, return_counts=True)
    if bool((counts > 1).any()):
        shared = unique[counts > 1][:5].tolist()
        raise ValueError(
            f"the receptive fields of targets {components} overlap (they share nodes {shared}), so "
            "their metamers cannot be put into one graph; use to_full_graph(target=i) per target")
    return field


def _edges_into(metamer: Data, rows: Tensor, graph: Data, field: Tensor) -> tuple[Tensor, Tensor | None]:
    """``graph``'s edges with every edge into ``field`` replaced by the metamer's edges into the
    chosen ``rows``: (edge_index [2, E'], edge_weight [E'] or None)."""
    others = [k for k in graph.keys() if k not in ("edge_index", "edge_weight") and graph.is_edge_attr(k)]
    if others:
        raise ValueError(f"graph has per-edge attributes {others} that cannot follow a structure "
                         "metamer's new edges; remove them before to_full_graph()")
    device = graph.edge_index.device
    in_field = torch.zeros(graph.num_nodes, dtype=torch.bool, device=device)
    in_field[field.to(device)] = True
    keep = ~in_field[graph.edge_index[1]]
    new = rows[metamer.edge_index[1]]
    edge_index = torch.cat([graph.edge_index[:, keep], metamer.n_id[metamer.edge_index[:, new]].to(device)], 1)
    old_w, new_w = getattr(graph, "edge_weight", None), getattr(metamer, "edge_weight", None)
    if old_w is None and new_w is None:
        return edge_index, None
    old_w = old_w[keep] if old_w is not None else torch.ones(int(keep.sum()), device=device)
    new_w = new_w[new].to(device, old_w.dtype) if new_w is not None else old_w.new_ones(int(new.sum()))
    return edge_index, torch.cat([old_w, new_w])
