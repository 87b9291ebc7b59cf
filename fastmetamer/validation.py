"""Input checks shared by every public entry point.

Each check raises a ``ValueError`` or ``TypeError`` whose message names the problem and what is
allowed, so bad input never reaches a kernel.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch_geometric.data import Data


def check_graph(graph: Data) -> None:
    """Check that ``graph`` is a PyG ``Data`` with finite float features and a valid edge list.

    Requires ``graph.x`` of shape [n, d] (floating point, no NaN/Inf), ``graph.edge_index`` of
    shape [2, E] (integer dtype, ids in [0, n)), and, if present, ``graph.edge_weight`` of shape
    [E] (finite).
    """
    if not isinstance(graph, Data):
        raise TypeError(f"graph must be a torch_geometric.data.Data, got {type(graph).__name__}")
    x = getattr(graph, "x", None)
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError("graph.x must be a 2-D tensor of node features [num_nodes, num_features]")
    if not x.is_floating_point():
        raise TypeError(f"graph.x must be floating point, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("graph has no nodes (graph.x has 0 rows)")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"graph.x contains NaN or Inf values (first affected nodes: {bad})")
    check_edge_index(getattr(graph, "edge_index", None), x.shape[0])
    weight = getattr(graph, "edge_weight", None)
    if weight is not None:
        if weight.shape != (graph.edge_index.shape[1],):
            raise ValueError(
                f"graph.edge_weight must have shape [{graph.edge_index.shape[1]}] "
                f"(one weight per edge), got {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError("graph.edge_weight contains NaN or Inf values")


def check_edge_index(edge_index, num_nodes: int) -> None:
    """Check an edge list: a [2, E] integer tensor with ids in [0, num_nodes)."""
    if not isinstance(edge_index, Tensor):
        raise TypeError("graph.edge_index must be a tensor of shape [2, num_edges]")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"graph.edge_index must have dtype torch.long, got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(
            f"graph.edge_index must have shape [2, num_edges], got {tuple(edge_index.shape)}")
    if edge_index.numel() and (edge_index.min() < 0 or edge_index.max() >= num_nodes):
        raise ValueError(
            f"graph.edge_index has node ids outside [0, {num_nodes}): "
            f"min {int(edge_index.min())}, max {int(edge_index.max())}")


def check_nodes(node, num_nodes: int) -> Tensor | None:
    """Normalise a target specification to a 1-D long tensor of distinct node ids (or ``None``).

    ``node`` may be ``None`` (all nodes jointly), an int, or a sequence / 1-D tensor of ints.
    """
    if node is None:
        return None
    if isinstance(node, bool):
        raise TypeError("node must be an int, a list of ints or None, got a bool")
    if isinstance(node, int):
        ids = torch.tensor([node])
    elif isinstance(node, Tensor):
        if node.is_floating_point() or node.dtype == torch.bool or node.dim() > 1:
            raise TypeError("a node tensor must be a 0-D or 1-D integer tensor")
        ids = node.reshape(-1).long().cpu()
    elif isinstance(node, Sequence) and not isinstance(node, str):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in node):
            raise TypeError("node list must contain only ints")
        ids = torch.tensor(list(node), dtype=torch.long)
    else:
        raise TypeError(f"node must be an int, a list of ints or None, got {type(node).__name__}")
    if ids.numel() == 0:
        raise ValueError("node list is empty: give at least one target node (or None for all)")
    if ids.min() < 0 or ids.max() >= num_nodes:
        bad = ids[(ids < 0) | (ids >= num_nodes)].tolist()[:5]
        raise ValueError(f"node ids out of range [0, {num_nodes}): {bad}")
    if ids.unique().numel() != ids.numel():
        raise ValueError("node list contains duplicate ids; each target must appear once")
    return ids
