"""Distances between a metamer's graph structure and the reference structure (SPEC §4).

Graphs are given as ``edge_index`` [2, E] (integer, ids in [0, num_nodes)) plus ``num_nodes``
(≥ 1, so isolated nodes count). All metrics treat a graph as *simple and undirected*: each edge
(u, v) is the unordered pair {u, v}, duplicates collapse, self loops are ignored, and edge
weights are not used. Edge sets are compared by node id, so they assume aligned node ids (as
for a metamer and its reference); the other metrics are invariant to node relabelling.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._common import check_edge_index, check_num_nodes, wasserstein1_columns
from .wl import wl_kernel


def _simple_edges(edge_index: Tensor) -> Tensor:
    """Unique undirected edges as an [E', 2] long tensor of (u, v) pairs with u < v."""
    pairs = edge_index.t()
    pairs = pairs[pairs[:, 0] != pairs[:, 1]].sort(dim=1).values
    return torch.unique(pairs, dim=0)


def _graph(edge_index, num_nodes, name: str) -> tuple[int, Tensor]:
    """Validate one graph and return (num_nodes, its unique undirected edges [E', 2])."""
    num_nodes = check_num_nodes(num_nodes, f"num_nodes of {name}")
    return num_nodes, _simple_edges(check_edge_index(edge_index, num_nodes, name))


def _degrees(num_nodes: int, edges: Tensor) -> Tensor:
    """Degree of every node of a simple undirected graph given by ``edges`` [E', 2] -> long [n]."""
    return torch.bincount(edges.flatten(), minlength=num_nodes)


def _label_values(labels, num_nodes: int, name: str) -> list | Tensor:
    """The given node labels as a flat tensor (numeric) or list (other hashables), checked to
    hold one label per node."""
    try:
        values = torch.as_tensor(labels).detach().cpu().flatten()
    except (TypeError, ValueError, RuntimeError):  # not numeric
        values = list(labels)
    if len(values) != num_nodes:
        raise ValueError(f"{name} must have one label per node ({num_nodes}), got {len(values)}")
    return values


def _initial_labels(labels, ref_labels, graphs: tuple) -> Tensor:
    """Ids [n + m] (0 .. L-1) of both graphs' initial WL labels, equal exactly where the labels
    are equal: the given labels (numbers or any hashable values) or else the degrees.
    ``graphs``: ((n, edges), (m, ref_edges))."""
    if labels is None:
        values = torch.cat([_degrees(k, e) for k, e in graphs])
    else:
        first, second = (_label_values(v, k, name) for v, (k, _), name in
                         zip((labels, ref_labels), graphs, ("labels", "ref_labels")))
        if isinstance(first, Tensor) and isinstance(second, Tensor):
            values = torch.cat([first, second])
        else:  # compare as Python values, as a dictionary does
            both = [*(first.tolist() if isinstance(first, Tensor) else first),
                    *(second.tolist() if isinstance(second, Tensor) else second)]
            ids = {value: i for i, value in enumerate(dict.fromkeys(both))}
            values = torch.tensor([ids[value] for value in both], dtype=torch.long)
    return torch.unique(values, return_inverse=True)[1]


def wl_similarity(edge_index, ref_edge_index, num_nodes: int, ref_num_nodes: int | None = None,
                  labels=None, ref_labels=None, iterations: int = 3) -> float:
    """Normalised Weisfeiler–Lehman subtree kernel similarity of two graphs.

    Equal to grakel ``WeisfeilerLehman(n_iter=iterations, base_graph_kernel=VertexHistogram,
    normalize=True)``, computed vectorised (:mod:`.wl`, O((n + E) log(n + E)) per iteration): the label histograms after 0, 1, ..., ``iterations`` refinement steps are
    concatenated into φ(G), and the result is <φ(G), φ(H)> / sqrt(<φ(G), φ(G)> <φ(H), φ(H)>).
    Node labels are ``labels`` / ``ref_labels`` (each [num_nodes], hashable values; give both or
    neither) or else the node degrees. ``ref_num_nodes`` defaults to ``num_nodes``.
    Returns a float in [0, 1]; 1.0 for identical (isomorphic, same labels) graphs. Graphs without
    edges and isolated nodes are fine.
    """
    if (labels is None) != (ref_labels is None):
        raise ValueError("give both labels and ref_labels, or neither (then degrees are used)")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    ref_num_nodes = num_nodes if ref_num_nodes is None else ref_num_nodes
    n, edges = _graph(edge_index, num_nodes, "edge_index")
    m, ref_edges = _graph(ref_edge_index, ref_num_nodes, "ref_edge_index")
    initial = _initial_labels(labels, ref_labels, ((n, edges), (m, ref_edges)))
    union = torch.cat([edges, ref_edges + n]).t()
    kernel = wl_kernel(initial, torch.cat([union[0], union[1]]), torch.cat([union[1], union[0]]),
                       torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(m, dtype=torch.long)]), 2,
                       iterations)
    return min(1.0, float(kernel[0, 1] / (kernel[0, 0] * kernel[1, 1]).sqrt()))


def edge_jaccard(edge_index, ref_edge_index) -> float:
    """Jaccard similarity |E ∩ E_ref| / |E ∪ E_ref| of the two undirected edge sets.

    ``edge_index``, ``ref_edge_index``: [2, E] and [2, E_ref] with aligned node ids. Self loops
    are ignored and duplicate / reversed edges collapse. Returns a float in [0, 1]; two empty
    edge sets give 1.0.
    """
    edges = _simple_edges(check_edge_index(edge_index, None, "edge_index"))
    ref_edges = _simple_edges(check_edge_index(ref_edge_index, None, "ref_edge_index"))
    union = torch.unique(torch.cat([edges, ref_edges]), dim=0).shape[0]
    if union == 0:
        return 1.0
    return (edges.shape[0] + ref_edges.shape[0] - union) / union


def degree_distance(edge_index, ref_edge_index, num_nodes: int, ref_num_nodes: int | None = None) -> float:
    """Wasserstein-1 distance between the two degree distributions (in units of degree).

    Each graph's degrees (isolated nodes count as degree 0) form an empirical distribution; the
    graphs may have different sizes (``ref_num_nodes`` defaults to ``num_nodes``). Returns a
    float in [0, inf); 0 when the degree sequences agree up to order.
    """
    ref_num_nodes = num_nodes if ref_num_nodes is None else ref_num_nodes
    n, edges = _graph(edge_index, num_nodes, "edge_index")
    m, ref_edges = _graph(ref_edge_index, ref_num_nodes, "ref_edge_index")
    deg, ref_deg = _degrees(n, edges), _degrees(m, ref_edges)
    return float(wasserstein1_columns(deg[:, None].double(), ref_deg[:, None].double())[0])


def _laplacian_spectrum(num_nodes: int, edges: Tensor) -> np.ndarray:
    """Eigenvalues of the normalised Laplacian (Chung's convention: L_vv = 0 for isolated v)."""
    adj = np.zeros((num_nodes, num_nodes))
    u, v = edges[:, 0].numpy(), edges[:, 1].numpy()
    adj[u, v] = adj[v, u] = 1.0
    deg = adj.sum(axis=1)
    inv_sqrt = np.divide(1.0, np.sqrt(deg), out=np.zeros_like(deg), where=deg > 0)
    laplacian = np.diag((deg > 0).astype(float)) - inv_sqrt[:, None] * adj * inv_sqrt[None, :]
    return np.linalg.eigvalsh(laplacian)


def spectral_distance(edge_index, ref_edge_index, num_nodes: int, ref_num_nodes: int | None = None,
                      max_nodes: int = 2000) -> float:
    """L2 distance between the sorted normalised-Laplacian spectra of two graphs (small graphs).

    L = I' - D^{-1/2} A D^{-1/2}, where I' has 1 on the diagonal for non-isolated nodes and 0 for
    isolated ones (Chung's convention), so eigenvalues lie in [0, 2] and an isolated node adds
    one eigenvalue 0. The smaller graph's spectrum is padded with zeros, which is the same as
    adding isolated nodes, then both are sorted and compared. Returns a float in [0, inf) (0 for
    isomorphic graphs), or nan when either graph has more than ``max_nodes`` nodes (dense
    O(n³) eigendecomposition).
    """
    ref_num_nodes = num_nodes if ref_num_nodes is None else ref_num_nodes
    n, edges = _graph(edge_index, num_nodes, "edge_index")
    m, ref_edges = _graph(ref_edge_index, ref_num_nodes, "ref_edge_index")
    if max(n, m) > max_nodes:
        return math.nan
    size = max(n, m)
    spectra = [np.sort(np.pad(_laplacian_spectrum(k, e), (0, size - k)))
               for k, e in ((n, edges), (m, ref_edges))]
    return float(np.linalg.norm(spectra[0] - spectra[1]))


def structure_distances(edge_index, ref_edge_index, num_nodes: int, ref_num_nodes: int | None = None,
                        labels=None, ref_labels=None, iterations: int = 3,
                        max_nodes: int = 2000) -> dict[str, float]:
    """All structure metrics of a graph against a reference graph.

    Returns ``{"wl", "edge_jaccard", "degree_w1", "spectral"}`` (floats) from
    :func:`wl_similarity`, :func:`edge_jaccard`, :func:`degree_distance` and
    :func:`spectral_distance`; arguments as there.
    """
    return {
        "wl": wl_similarity(edge_index, ref_edge_index, num_nodes, ref_num_nodes,
                            labels, ref_labels, iterations),
        "edge_jaccard": edge_jaccard(edge_index, ref_edge_index),
        "degree_w1": degree_distance(edge_index, ref_edge_index, num_nodes, ref_num_nodes),
        "spectral": spectral_distance(edge_index, ref_edge_index, num_nodes, ref_num_nodes, max_nodes),
    }
