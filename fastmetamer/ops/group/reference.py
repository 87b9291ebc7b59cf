"""Grouping entries by an integer key, in PyTorch (the contract of the ``group`` op family).

``group_by(keys, num_groups) -> (rowptr, order)``: ``keys`` [E] int64 in [0, num_groups);
``rowptr`` [num_groups + 1] int64 offsets and ``order`` [E] int64 such that
``order[rowptr[g]:rowptr[g + 1]]`` are the entries with key g in ascending order (a stable
argsort). O(E log E) here; the backends do it in O(E + num_groups).

``append_node_entries(rowptr, source, edge_id, node_col) -> (rowptr, col, order)``: the CSR of an
operator whose coordinate entries are a graph's E edges followed by one entry per node, from the
graph's in-edge CSR (``rowptr`` [n + 1], ``source`` [E], ``edge_id`` [E]): row i holds node i's
in-edges in CSR order, then its node entry (column ``node_col[i]``, coordinate E + i); ``order``
[E + n] is the coordinate index of every CSR entry. O(E + n) writes, no sort.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_keys(keys: Tensor, num_groups: int) -> None:
    """Raise ValueError unless ``keys`` is a 1-D int64 tensor and ``num_groups`` a count >= 0
    (the backends check the range of the keys themselves)."""
    if not isinstance(keys, Tensor) or keys.dtype != torch.long or keys.dim() != 1:
        raise ValueError(f"keys must be a 1-D int64 tensor, got {getattr(keys, 'dtype', type(keys))} "
                         f"of shape {tuple(getattr(keys, 'shape', ()))}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")


def group_by(keys: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """(rowptr [num_groups + 1], order [E]) of ``keys`` [E] grouped by value (see the module)."""
    check_keys(keys, num_groups)
    if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= num_groups):
        raise ValueError(f"keys must lie in [0, num_groups = {num_groups})")
    rowptr = torch.zeros(num_groups + 1, dtype=torch.long, device=keys.device)
    torch.cumsum(torch.bincount(keys, minlength=num_groups), 0, out=rowptr[1:])
    return rowptr, torch.argsort(keys, stable=True)


def check_in_edges(rowptr: Tensor, source: Tensor, edge_id: Tensor, node_col: Tensor) -> None:
    """Raise ValueError unless the arguments of ``append_node_entries`` are 1-D int64 tensors of
    matching sizes and ``rowptr`` rises from 0 to E."""
    for name, t in (("rowptr", rowptr), ("source", source), ("edge_id", edge_id), ("node_col", node_col)):
        if not isinstance(t, Tensor) or t.dtype != torch.long or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t))} "
                             f"of shape {tuple(getattr(t, 'shape', ()))}")
    n, num_edges = rowptr.numel() - 1, source.numel()
    if n < 0 or edge_id.numel() != num_edges or node_col.numel() != n:
        raise ValueError(f"need rowptr [n + 1], source and edge_id [E], node_col [n]; got {rowptr.numel()}, "
                         f"{num_edges}, {edge_id.numel()}, {node_col.numel()}")
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != num_edges or bool((rowptr.diff() < 0).any()):
        raise ValueError(f"rowptr must rise from 0 to the number of edges ({num_edges})")


def append_node_entries(rowptr: Tensor, source: Tensor, edge_id: Tensor,
                        node_col: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rowptr [n + 1], col [E + n], order [E + n]): the in-edge CSR with one entry per node
    appended to each row (see the module)."""
    check_in_edges(rowptr, source, edge_id, node_col)
    n, num_edges = rowptr.numel() - 1, source.numel()
    nodes = torch.arange(n + 1, device=rowptr.device)
    out_rowptr = rowptr + nodes
    edge_slot = torch.arange(num_edges, device=rowptr.device) + torch.repeat_interleave(nodes[:-1], rowptr.diff())
    node_slot = out_rowptr[1:] - 1
    order = torch.empty(num_edges + n, dtype=torch.long, device=rowptr.device)
    order[edge_slot] = edge_id
    order[node_slot] = nodes[:-1] + num_edges
    col = torch.empty_like(order)
    col[edge_slot] = source
    col[node_slot] = node_col
    return out_rowptr, col, order
