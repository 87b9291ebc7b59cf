"""Extra keyword arguments of a model's forward (``forward_kwargs=``, e.g. ``edge_attr``) and
how they follow the graph when a receptive field, a probe graph or another graph is run.

A tensor argument is *per-node* when its first dimension is the graph's node count n, *per-edge*
when it is the edge count E (when n == E, per-edge if its name starts with ``"edge"``); its rows
are then taken with the nodes / edges of every subgraph. Anything else is passed unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch_geometric.data import Data

__all__ = ["ForwardKwargs", "RESERVED"]

RESERVED = ("x", "edge_index", "edge_weight", "batch")


@dataclass(frozen=True)
class ForwardKwargs:
    """``forward_kwargs`` split by what their rows index.

    Attributes:
        nodes: per-node tensors {name: [n, ...]}.
        edges: per-edge tensors {name: [E, ...]}.
        other: everything else, passed unchanged.
    """

    nodes: dict[str, Tensor] = field(default_factory=dict)
    edges: dict[str, Tensor] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def split(cls, kwargs: dict | None, num_nodes: int, num_edges: int) -> "ForwardKwargs":
        """Classify ``kwargs`` for a graph of ``num_nodes`` nodes and ``num_edges`` edges."""
        if kwargs is None:
            return cls()
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TypeError("forward_kwargs must be a dict of keyword arguments {name: value}, "
                            f"got {type(kwargs).__name__}")
        taken = sorted(set(kwargs) & set(RESERVED))
        if taken:
            raise ValueError(f"forward_kwargs may not set {taken}: fastmetamer passes "
                             f"{list(RESERVED)} itself")
        nodes, edges, other = {}, {}, {}
        for name, value in kwargs.items():
            rows = value.shape[0] if isinstance(value, Tensor) and value.dim() > 0 else None
            if rows == num_edges and (rows != num_nodes or name.startswith("edge")):
                edges[name] = value
            elif rows == num_nodes:
                nodes[name] = value
            else:
                other[name] = value
        return cls(nodes, edges, other)

    def __bool__(self) -> bool:
        return bool(self.nodes or self.edges or self.other)

    def as_dict(self) -> dict:
        """All arguments as one dict for the model's forward."""
        return {**self.other, **self.nodes, **self.edges}

    def take(self, node_ids: Tensor, edge_ids: Tensor) -> dict:
        """The arguments for a subgraph with original node ids ``node_ids`` [m] and original edge
        ids ``edge_ids`` [E_sub] (rows of per-node / per-edge tensors taken in that order)."""
        nodes = {k: v[node_ids.to(v.device)] for k, v in self.nodes.items()}
        edges = {k: v[edge_ids.to(v.device)] for k, v in self.edges.items()}
        return {**self.other, **nodes, **edges}

    def probe(self) -> dict:
        """The arguments for a two-node, two-edge probe graph (the first rows, repeated or zero
        where the graph has fewer)."""
        return {**self.other, **{k: _two_rows(v) for k, v in self.nodes.items()},
                **{k: _two_rows(v) for k, v in self.edges.items()}}

    def of_graph(self, graph: Data) -> dict:
        """The arguments for another graph (e.g. a batch of null graphs): per-node and per-edge
        arguments are read from its attributes of the same name."""
        missing = [k for k in (*self.nodes, *self.edges) if not isinstance(getattr(graph, k, None), Tensor)]
        if missing:
            raise ValueError(f"forward_kwargs {missing} are per-node / per-edge, so every other "
                             "graph run (null_graphs) must carry them as attributes of that name")
        return {**self.other, **{k: getattr(graph, k) for k in (*self.nodes, *self.edges)}}


def _two_rows(value: Tensor) -> Tensor:
    """The first two rows of ``value`` [r, ...] (repeated when r == 1, zeros when r == 0)."""
    if value.shape[0] == 0:
        return value.new_zeros((2, *value.shape[1:]))
    return value[:2] if value.shape[0] >= 2 else value.repeat(2, *([1] * (value.dim() - 1)))
