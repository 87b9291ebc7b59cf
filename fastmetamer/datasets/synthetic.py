"""Built-in synthetic graphs: no files, no network, deterministic by seed.

* :func:`synthetic_graph` — a contextual stochastic block model (CSBM) with sparse binary
  bag-of-words features, for node classification.
* :func:`synthetic_graphs` — small trees vs. trees with a planted cycle, for graph
  classification.

Every random draw goes through a local :class:`torch.Generator`; the global RNG is untouched.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.utils import remove_self_loops, to_undirected

from .splits import planetoid_split

#: Share of each class's word distribution that is its own topic (the rest is a background
#: word distribution common to all classes): features are informative but not trivially so.
TOPIC_WEIGHT = 0.5
#: Spread of the word log-frequencies (higher: a few words dominate each topic).
WORD_LOGIT_SCALE = 1.5


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_graph_args(num_nodes, num_classes, num_features, avg_degree, homophily,
                      words_per_node) -> None:
    _check(isinstance(num_classes, int) and num_classes >= 2,
           f"num_classes must be an int >= 2, got {num_classes!r}")
    _check(isinstance(num_nodes, int) and num_nodes >= 3 * num_classes,
           f"num_nodes must be an int >= 3 * num_classes = {3 * num_classes}, got {num_nodes!r}")
    _check(isinstance(num_features, int) and num_features >= 1,
           f"num_features must be an int >= 1, got {num_features!r}")
    _check(0.0 < avg_degree <= num_nodes - 1,
           f"avg_degree must be in (0, num_nodes - 1 = {num_nodes - 1}], got {avg_degree!r}")
    _check(0.0 <= homophily <= 1.0, f"homophily must be in [0, 1], got {homophily!r}")
    _check(isinstance(words_per_node, int) and 1 <= words_per_node <= num_features,
           f"words_per_node must be an int in [1, num_features = {num_features}], "
           f"got {words_per_node!r}")


def _random_in_class(classes: Tensor, by_class: Tensor, offsets: Tensor, counts: Tensor,
                     g: torch.Generator) -> Tensor:
    """A uniformly random node of each given class; ``classes`` shape ``[M]`` -> ``[M]``."""
    u = torch.rand(classes.numel(), generator=g)
    pos = offsets[classes] + (u * counts[classes]).long().clamp_max(counts[classes] - 1)
    return by_class[pos]


def _csbm_edges(y: Tensor, num_classes: int, avg_degree: float, homophily: float,
                g: torch.Generator) -> Tensor:
    """Undirected, coalesced edges without self loops, shape ``[2, E]``; a share
    ``homophily`` of the sampled pairs join two nodes of the same class."""
    n = y.numel()
    num_pairs = round(n * avg_degree / 2)
    counts = torch.bincount(y, minlength=num_classes)
    offsets = torch.cumsum(counts, 0) - counts
    by_class = torch.argsort(y, stable=True)
    src = torch.randint(n, (num_pairs,), generator=g)
    same = torch.rand(num_pairs, generator=g) < homophily
    shift = torch.randint(1, num_classes, (num_pairs,), generator=g)
    dst_class = torch.where(same, y[src], (y[src] + shift) % num_classes)
    dst = _random_in_class(dst_class, by_class, offsets, counts, g)
    edge_index, _ = remove_self_loops(torch.stack([src, dst]))
    return to_undirected(edge_index, num_nodes=n)


def _bag_of_words(y: Tensor, num_classes: int, num_features: int, words_per_node: int,
                  g: torch.Generator) -> Tensor:
    """Binary features, shape ``[N, num_features]`` float32, ``words_per_node`` ones per
    row, drawn without replacement from the node's class word distribution."""
    background = torch.softmax(WORD_LOGIT_SCALE * torch.randn(num_features, generator=g), 0)
    topics = torch.softmax(WORD_LOGIT_SCALE * torch.randn(num_classes, num_features,
                                                          generator=g), 1)
    probs = (1 - TOPIC_WEIGHT) * background + TOPIC_WEIGHT * topics
    words = torch.multinomial(probs[y], words_per_node, replacement=False, generator=g)
    return torch.zeros(y.numel(), num_features).scatter_(1, words, 1.0)


def _split_sizes(num_nodes: int, num_classes: int) -> tuple[int, int, int]:
    """Planetoid sizes (20 per class / 500 / 1000), scaled down for small graphs."""
    train_per_class = max(1, min(20, num_nodes // (10 * num_classes)))
    rest = num_nodes - train_per_class * num_classes
    num_val = min(500, rest // 3)
    return train_per_class, num_val, min(1000, rest - num_val)


def synthetic_graph(num_nodes: int = 2000, num_classes: int = 5, num_features: int = 500,
                    avg_degree: float = 8.0, homophily: float = 0.8, words_per_node: int = 15,
                    seed: int = 0) -> Data:
    """A contextual stochastic block model graph with sparse binary bag-of-words features.

    Classes are balanced (sizes differ by at most one). ``round(num_nodes * avg_degree / 2)``
    node pairs are drawn; a share ``homophily`` of them joins two nodes of the same class, the
    others two nodes of different classes; self loops and duplicates are dropped, so the mean
    degree is slightly below ``avg_degree`` and the edge homophily close to ``homophily``.
    Each class has its own word distribution (a mix of a shared background and a class topic);
    every node holds ``words_per_node`` distinct words of its class's distribution.

    Args:
        num_nodes: N, at least ``3 * num_classes``.
        num_classes: C >= 2.
        num_features: vocabulary size D.
        avg_degree: expected mean degree, in ``(0, N - 1]``.
        homophily: expected share of intra-class edges, in ``[0, 1]``.
        words_per_node: ones per feature row, in ``[1, D]``.
        seed: seed of the local generator; equal seeds give identical graphs.

    Returns:
        ``Data`` with ``x`` ``[N, D]`` float32 in {0, 1}, ``edge_index`` ``[2, E]`` long
        (undirected, coalesced, no self loops), ``y`` ``[N]`` long, and bool masks
        ``train_mask`` / ``val_mask`` / ``test_mask`` ``[N]`` (disjoint; 20 per class /
        500 / 1000 as in Planetoid, scaled down when N is small).

    Raises:
        ValueError: on an out-of-range argument.
    """
    _check_graph_args(num_nodes, num_classes, num_features, avg_degree, homophily,
                      words_per_node)
    g = torch.Generator().manual_seed(seed)
    y = torch.randperm(num_nodes, generator=g) % num_classes
    edge_index = _csbm_edges(y, num_classes, avg_degree, homophily, g)
    x = _bag_of_words(y, num_classes, num_features, words_per_node, g)
    train, val, test = planetoid_split(y, *_split_sizes(num_nodes, num_classes), seed=seed)
    return Data(x=x, edge_index=edge_index, y=y, train_mask=train, val_mask=val,
                test_mask=test)


def _random_tree(num_nodes: int, g: torch.Generator) -> Tensor:
    """Random recursive tree: node i > 0 attaches to a uniform node < i; ``[2, n - 1]``."""
    child = torch.arange(1, num_nodes)
    parent = (torch.rand(num_nodes - 1, generator=g) * child).long()
    return torch.stack([parent, child])


def _tree_with_cycle(num_nodes: int, cycle_len: int, g: torch.Generator) -> Tensor:
    """A random tree on ``n - cycle_len`` nodes plus a ``cycle_len``-cycle of new nodes
    hanging from a random tree node by one edge; shape ``[2, n]``."""
    base = num_nodes - cycle_len
    ring = torch.arange(base, num_nodes)
    cycle = torch.stack([ring, ring.roll(-1)])
    anchor = torch.randint(base, (1,), generator=g)
    bridge = torch.stack([anchor, ring[:1]])
    return torch.cat([_random_tree(base, g), cycle, bridge], dim=1)


def _one_graph(label: int, min_nodes: int, max_nodes: int, num_node_labels: int,
               g: torch.Generator) -> Data:
    n = int(torch.randint(min_nodes, max_nodes + 1, (1,), generator=g))
    if label == 0:
        edges = _random_tree(n, g)
    else:
        edges = _tree_with_cycle(n, int(torch.randint(3, min(6, n - 1) + 1, (1,),
                                                      generator=g)), g)
    node_labels = torch.randint(num_node_labels, (n,), generator=g)
    x = torch.nn.functional.one_hot(node_labels, num_node_labels).float()
    return Data(x=x, edge_index=to_undirected(edges, num_nodes=n), y=torch.tensor([label]), num_nodes=n)


def synthetic_graphs(num_graphs: int = 200, min_nodes: int = 10, max_nodes: int = 30,
                     num_node_labels: int = 3, seed: int = 0) -> list[Data]:
    """Small graphs for graph classification: label 0 = random tree, label 1 = random tree
    with a planted cycle (length 3-6) hanging from it. Node features are one-hot random node
    labels (uninformative, like atom types); only the structure tells the classes apart.

    Args:
        num_graphs: number of graphs; labels alternate, so classes are balanced.
        min_nodes, max_nodes: node count range (inclusive), ``4 <= min_nodes <= max_nodes``.
        num_node_labels: width F of the one-hot node features, >= 1.
        seed: seed of the local generator; equal seeds give identical lists.

    Returns:
        ``list`` of ``Data`` with ``x`` ``[n, F]`` float32 one-hot, ``edge_index`` ``[2, E]``
        (undirected, coalesced, no self loops) and ``y`` ``[1]`` long in {0, 1}.

    Raises:
        ValueError: on an out-of-range argument.
    """
    _check(isinstance(num_graphs, int) and num_graphs >= 1,
           f"num_graphs must be an int >= 1, got {num_graphs!r}")
    _check(isinstance(min_nodes, int) and min_nodes >= 4,
           f"min_nodes must be an int >= 4, got {min_nodes!r}")
    _check(isinstance(max_nodes, int) and max_nodes >= min_nodes,
           f"max_nodes must be an int >= min_nodes = {min_nodes}, got {max_nodes!r}")
    _check(isinstance(num_node_labels, int) and num_node_labels >= 1,
           f"num_node_labels must be an int >= 1, got {num_node_labels!r}")
    g = torch.Generator().manual_seed(seed)
    return [_one_graph(i % 2, min_nodes, max_nodes, num_node_labels, g)
            for i in range(num_graphs)]
