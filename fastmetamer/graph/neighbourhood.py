"""Vectorised neighbourhoods: the in-edge CSR of a graph (built once, cached) and the hop rings
of many targets found in one frontier expansion over it.

A node u is within h hops of v when a path of at most h edges leads from u to v (messages flow
from source to destination, as in ``torch_geometric.utils.k_hop_subgraph`` with its default
``flow="source_to_target"``). The expansion walks the in-edges of every target's frontier at
once, so its cost is proportional to the edges the rings touch (times a log for the sorts), not
to the size of the graph; no Python loop runs over targets, nodes or edges.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import dispatch


@dataclass(frozen=True)
class InEdges:
    """The edges of a graph grouped by destination (CSR of the in-edges).

    Attributes:
        num_nodes: n.
        rowptr: [n + 1] int64 offsets: the in-edges of node v are entries ``rowptr[v]:rowptr[v+1]``.
        source: [E] source node of every entry.
        edge_id: [E] column of the graph's ``edge_index`` of every entry (ascending within a row).
    """

    num_nodes: int
    rowptr: Tensor
    source: Tensor
    edge_id: Tensor

    @classmethod
    def build(cls, edge_index: Tensor, num_nodes: int) -> "InEdges":
        """O(E + n) construction (a counting sort) from ``edge_index`` [2, E] (source, destination)."""
        rowptr, edge_id = dispatch.group_by(edge_index[1].contiguous(), num_nodes)
        return cls(num_nodes, rowptr, edge_index[0].index_select(0, edge_id), edge_id)

    def entries(self, nodes: Tensor) -> tuple[Tensor, Tensor]:
        """The in-edge entries of ``nodes`` [P]: (owner [M], entry [M]); ``owner`` indexes
        ``nodes``, ``entry`` indexes :attr:`source` / :attr:`edge_id`; grouped by owner."""
        starts = self.rowptr[nodes]
        return expand_ranges(starts, self.rowptr[nodes + 1] - starts)


def expand_ranges(starts: Tensor, counts: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """The ranges ``starts[i] : starts[i] + counts[i]`` [R] laid end to end: (owner [M]: the range
    i of every element, index [M]: its value), with M = counts.sum(); ``total``: M when the caller
    knows it (no host read of ``counts`` on an accelerator)."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=total)
    offsets = torch.cumsum(counts, 0) - counts
    return owner, starts[owner] + torch.arange(owner.numel(), device=counts.device) - offsets[owner]


#: ``id(edge_index)`` -> (weak reference, tensor version, n, InEdges); entries die with the tensor.
_CACHE: dict[int, tuple] = {}


def in_edges(edge_index: Tensor, num_nodes: int) -> InEdges:
    """The :class:`InEdges` of ``edge_index`` [2, E], built on first use and cached for as long as
    that tensor lives unchanged (an in-place edit of it, or another ``num_nodes``, rebuilds)."""
    key = id(edge_index)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is edge_index and hit[1] == edge_index._version and hit[2] == num_nodes:
        return hit[3]
    csr = InEdges.build(edge_index, num_nodes)
    _CACHE[key] = (weakref.ref(edge_index, lambda _, key=key: _CACHE.pop(key, None)), edge_index._version,
                   num_nodes, csr)
    return csr


@dataclass(frozen=True)
class Rings:
    """Nodes within ``radius`` hops of each group of targets, as (group, node) pairs.

    Attributes:
        group: [P] the group of every pair (ascending).
        node: [P] the node of every pair (ascending within a group).
        hop: [P] the node's distance in hops from the group's nearest target.
    """

    group: Tensor
    node: Tensor
    hop: Tensor


def rings(csr: InEdges, targets: Tensor, group: Tensor, radius: int) -> Rings:
    """Every node within ``radius`` hops of the ``targets`` [T] of each group (``group`` [T]: the
    group of every target; targets of one group share their rings), with its hop distance.

    Cost O(M log M) for the M in-edge entries of the nodes within ``radius - 1`` hops."""
    n = csr.num_nodes
    frontier = torch.unique(group * n + targets)
    seen, hops = [frontier], [torch.zeros_like(frontier)]
    for hop in range(1, radius + 1):
        if frontier.numel() == 0:
            break
        owner, entry = csr.entries(frontier % n)
        reached = torch.unique((frontier // n)[owner] * n + csr.source[entry])
        frontier = reached[~torch.isin(reached, torch.cat(seen))]
        seen.append(frontier)
        hops.append(torch.full_like(frontier, hop))
    keys, order = torch.sort(torch.cat(seen))
    return Rings(keys // n, keys % n, torch.cat(hops)[order])


__all__ = ["InEdges", "in_edges", "Rings", "rings", "expand_ranges"]
