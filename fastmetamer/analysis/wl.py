"""Weisfeiler–Lehman subtree features of many graphs at once, vectorised (no loop over nodes).

Exactly grakel's ``WeisfeilerLehman(n_iter=h, base_graph_kernel=VertexHistogram)``: labels are
refined h times; a node's new label is an injective function of its label and the multiset of
its neighbours' labels, shared by all graphs of the call; φ_i(G) counts the labels of G after i
refinements and k(G, H) = Σ_{i=0..h} <φ_i(G), φ_i(H)>. Each refinement is O((N + M) log(N + M))
for N nodes and M adjacency entries: a multiset gets two random 64-bit sum hashes, nodes are
grouped by (label, hashes), and every group is then checked entry by entry against its first
node's sorted neighbour labels, so a hash collision can never merge two labels (it would raise).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _random_codes(count: int, seed: int) -> Tensor:
    """``count`` pseudo-random int64 codes (fixed seed: the result never depends on a draw)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-2**63, 2**63 - 1, (count,), generator=gen, dtype=torch.long)


def _sorted_neighbour_labels(src: Tensor, dst: Tensor, labels: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Adjacency entries grouped by node, labels ascending within a node: (rowptr [N+1], labels [M])."""
    num_labels = int(labels.max()) + 1 if labels.numel() else 1
    order = torch.argsort(dst * num_labels + labels[src])
    rowptr = torch.zeros(num_nodes + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(dst, minlength=num_nodes), 0, out=rowptr[1:])
    return rowptr, labels[src[order]]


def _check_no_collision(labels: Tensor, new: Tensor, rowptr: Tensor, neighbour_labels: Tensor) -> None:
    """Every node must have its group's first node's label, degree and sorted neighbour labels."""
    first = torch.full((int(new.max()) + 1,), labels.numel(), dtype=torch.long).scatter_reduce(
        0, new, torch.arange(labels.numel()), "amin")
    rep = first[new]
    degree = rowptr.diff()
    same = torch.equal(labels, labels[rep]) and torch.equal(degree, degree[rep])
    if same and neighbour_labels.numel():
        node = torch.repeat_interleave(torch.arange(labels.numel()), degree)
        slot = torch.arange(neighbour_labels.numel()) - rowptr[node] + rowptr[rep[node]]
        same = torch.equal(neighbour_labels, neighbour_labels[slot])
    if not same:
        raise RuntimeError("Weisfeiler-Lehman multiset hash collision; please report this graph")


def refine(labels: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """One WL refinement: ``labels`` [N] int64 (0 .. L-1), adjacency entries ``src`` -> ``dst``
    [M] (each undirected edge in both directions) -> new labels [N] in 0 .. L'-1, equal exactly
    when (label, multiset of neighbour labels) are equal."""
    n = labels.numel()
    num_labels = int(labels.max()) + 1
    hashes = [torch.zeros(n, dtype=torch.long).index_add_(0, dst, _random_codes(num_labels, seed)[labels[src]])
              for seed in (1, 2)]
    _, new = torch.unique(torch.stack([labels, *hashes], dim=1), dim=0, return_inverse=True)
    rowptr, neighbour_labels = _sorted_neighbour_labels(src, dst, labels, n)
    _check_no_collision(labels, new, rowptr, neighbour_labels)
    return new


def wl_kernel(labels: Tensor, src: Tensor, dst: Tensor, graph: Tensor, num_graphs: int, iterations: int) -> Tensor:
    """Unnormalised WL subtree kernel matrix [G, G] (float64) of the graphs of a disjoint union.

    ``labels`` [N] int64 initial labels (0 .. L-1), ``src``/``dst`` [M] adjacency entries of the
    union (both directions, no self loops, no duplicates), ``graph`` [N] the graph of each node
    (0 .. G-1), ``iterations`` h >= 1 refinements (grakel's ``n_iter``)."""
    kernel = torch.zeros(num_graphs, num_graphs, dtype=torch.float64)
    for i in range(iterations + 1):
        if i:
            labels = refine(labels, src, dst)
        num_labels = int(labels.max()) + 1
        counts = torch.bincount(graph * num_labels + labels, minlength=num_graphs * num_labels)
        counts = counts.view(num_graphs, num_labels).double()
        kernel += counts @ counts.t()
    return kernel
