"""Partitioning a whole graph's nodes across the ranks of a process group (SPEC §10).

The nodes are put in a locality-preserving order, the reverse Cuthill–McKee order of the
symmetrised graph (``scipy.sparse.csgraph``; METIS is not used), and cut into consecutive runs
balanced by cost (one per node plus its in-edges). Rank r then *owns* its run O_r: the
parameters, optimiser state and gradient of those rows live only there.

A layer's output at an owned node reads its in-neighbours. Those outside O_r form the *halo*
H_r, whose rows rank r receives from their owners before every message-passing step (see
:mod:`fastmetamer.distributed.halo`). The part also holds the in-neighbours of the halo (a
second ring that is never exchanged) and every edge into O_r and H_r, so that quantities
a convolution derives from the edges into a source node, such as GCN's degree normalisation,
are exact for halo rows as well. Every rank computes every rank's part from the whole graph
without communication.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor


def locality_order(edge_index: Tensor, num_nodes: int) -> Tensor:
    """[n] the node ids in reverse Cuthill–McKee order of the symmetrised graph: neighbours get
    nearby positions, so consecutive runs of this order share few edges (where the graph has
    locality at all)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    if num_nodes == 0:
        return torch.empty(0, dtype=torch.long)
    src, dst = edge_index.cpu().numpy().astype(np.int32, copy=False)
    ones = np.ones(src.shape[0], dtype=np.int8)
    adjacency = sp.csr_matrix((np.concatenate([ones, ones]), (np.concatenate([src, dst]), np.concatenate([dst, src]))),
                              shape=(num_nodes, num_nodes))
    order = reverse_cuthill_mckee(adjacency, symmetric_mode=True)
    return torch.from_numpy(order.astype(np.int64)).to(edge_index.device)


def owners(edge_index: Tensor, num_nodes: int, parts: int) -> Tensor:
    """[n] the rank that owns each node: consecutive runs of :func:`locality_order`, balanced
    by cost (1 + in-degree) with :func:`fastmetamer.distributed.share`."""
    from ..distributed import share

    order = locality_order(edge_index, num_nodes)
    cost = 1 + torch.bincount(edge_index[1], minlength=num_nodes)
    sizes = torch.tensor(share(cost[order], parts), device=edge_index.device)
    owner = torch.empty(num_nodes, dtype=torch.long, device=edge_index.device)
    owner[order] = torch.repeat_interleave(torch.arange(parts, device=edge_index.device), sizes,
                                           output_size=num_nodes)
    return owner


@dataclass
class Part:
    """Rank ``rank``'s share of a graph partitioned over ``world`` ranks.

    Attributes:
        nodes: [m] global id of every local row: the owned nodes (in id order), then the halo
            H (sorted), then the second ring (sorted).
        num_owned, num_halo: |O| and |H|.
        edges: [E_local] ids (columns of the graph's ``edge_index``) of the local edges, the
            edges into O and H, in the graph's order.
        edge_index: [2, E_local] the local edges in local row ids.
        send_rows: [|B|] local rows (owned) that other ranks read, in global id order: this
            rank's block of every exchange.
        halo_slot: [|H|] where each halo row lies in the exchanged buffer [world * width, ...]
            (its owner's block, then its position there).
        width: rows of one rank's block (the largest |B| of any rank).
        owner: [n] the rank that owns each node (every rank's owned ids follow from it).
    """

    rank: int
    world: int
    nodes: Tensor
    num_owned: int
    num_halo: int
    edges: Tensor
    edge_index: Tensor
    send_rows: Tensor
    halo_slot: Tensor
    width: int
    owner: Tensor

    @property
    def owned(self) -> Tensor:
        """[|O|] global ids of the owned nodes (id order)."""
        return self.nodes[:self.num_owned]

    @cached_property
    def ids_by_owner(self) -> Tensor:
        """[n] every node's global id grouped by owning rank (rank 0's first), id order within a
        rank: the order of the ranks' owned rows laid end to end."""
        return torch.argsort(self.owner, stable=True)


def build_part(edge_index: Tensor, owner: Tensor, rank: int, world: int) -> Part:
    """Rank ``rank``'s :class:`Part` of the graph with ``edge_index`` [2, E] whose nodes are
    owned as ``owner`` [n] says (every rank's part follows from the same two tensors)."""
    n, device = owner.numel(), owner.device
    src, dst = edge_index
    crossing = owner[src] != owner[dst]
    boundary = torch.zeros(n, dtype=torch.bool, device=device)
    boundary[src[crossing]] = True  # rows some other rank reads
    sent = [((owner == q) & boundary).nonzero().flatten() for q in range(world)]  # ids, sorted
    width = max(int(s.numel()) for s in sent)
    mine = owner == rank
    halo = _sources_into(src, dst, mine, exclude=mine)
    inner = mine.clone()
    inner[halo] = True
    ring = _sources_into(src, dst, inner, exclude=inner)
    nodes = torch.cat([mine.nonzero().flatten(), halo, ring])
    local = torch.full((n,), -1, dtype=torch.long, device=device)
    local[nodes] = torch.arange(nodes.numel(), device=device)
    edges = inner[dst].nonzero().flatten()
    halo_owner = owner[halo]
    position = torch.zeros_like(halo)
    for q in range(world):
        at = halo_owner == q
        position[at] = torch.searchsorted(sent[q], halo[at])
    return Part(rank=rank, world=world, nodes=nodes, num_owned=int(mine.sum()), num_halo=int(halo.numel()),
                edges=edges, edge_index=local[edge_index[:, edges]], send_rows=local[sent[rank]],
                halo_slot=halo_owner * width + position, width=width, owner=owner)


def _sources_into(src: Tensor, dst: Tensor, into: Tensor, exclude: Tensor) -> Tensor:
    """Sorted ids of the sources of edges whose destination is in ``into`` [n] bool, excluding
    the nodes in ``exclude`` [n] bool."""
    sources = src[into[dst]]
    return torch.unique(sources[~exclude[sources]])
