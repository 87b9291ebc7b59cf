"""``MetamerResult``: what ``fastmetamer.generate`` returns."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import Data

from .full_graph import put_in


def _plain(value: Any) -> Any:
    """Convert tensors (and containers of them) to JSON-friendly Python values."""
    if isinstance(value, Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


@dataclass
class MetamerResult:
    """A generated metamer and how good it is.

    Attributes:
        graph: the metamer (for node targets: the receptive-field subgraph, or a disjoint union
            of one per target with ``batch``); fields x, edge_index, [edge_weight], n_id
            (original node ids), free_mask (optimised nodes), batch, center.
        reference: the same subgraph of the reference graph.
        center: local index of the target (int) or indices [T] in ``graph`` / ``reference``.
        loss: final L_act of the returned (hard) metamer: a float, or [T] per target.
        history: L_act before each straight-through step, then after each iteration of the
            discrete swap search: [steps] for one problem, [steps, T] for several.
        passed: the null-distribution criterion: bool, or [T] (per node for a whole graph);
            never True for a trivial target.
        trivial: bool, or [T]: the metamer came back identical to the reference over R (e.g. no
            free entry: no ones to move, no free edge slot): it claims nothing, never a pass.
        distance: ||h' - h|| per target [T] (the quantity the criterion compares).
        null_threshold: per target [T], the smallest distance of another real node that is not a
            twin. For a whole-graph metamer of node activations (``node=None``) the criterion is a
            range query and this is a certificate instead: for a node that fails, the distance of
            a node at least as close as the metamer; for one that passes, a lower bound on the
            smallest distance that exceeds the metamer's (see
            :func:`~fastmetamer.metamers.criterion.whole_graph_passes`).
        twins: per target [T], the number of real nodes with identical activation.
        metrics: activation / feature / structure distances (floats, or lists per target).
        kind, layer, hops, nodes: what was asked (nodes: original ids, None = whole graph).
        seconds: wall time of the optimisation.
        settings: the resolved options.
        gradient_steps: how many rows of ``history`` come from the straight-through gradient
            phase (the rows after them are swap-search iterations).
        input_graph: the graph passed to ``generate`` (a reference, not a copy), used by
            :meth:`to_full_graph`; neither saved nor pickled (None after :meth:`load`).

    Scalars or tensors: ``loss``, ``history`` and ``metrics`` are per independent problem: a
    float / [steps] / floats when there is one problem (one target node, given as an int or a
    one-element list, or one whole graph), else [T] / [steps, T] / lists of T. ``center``,
    ``passed`` and ``trivial`` are per target: an int / bool only for one target node, else
    tensors [T], in the order given; a whole-graph result (``node=None``) always has tensors, one
    entry per node ([n]) for a node-level layer and one per graph for a pooled layer.
    ``distance``, ``null_threshold`` and ``twins`` are always tensors [T].
    """

    graph: Data
    reference: Data
    center: int | Tensor
    loss: float | Tensor
    history: Tensor
    passed: bool | Tensor
    trivial: bool | Tensor
    distance: Tensor
    null_threshold: Tensor
    twins: Tensor
    metrics: dict
    kind: str
    layer: str
    hops: int
    nodes: list[int] | None
    seconds: float
    settings: dict = field(default_factory=dict)
    gradient_steps: int = 0
    input_graph: Data | None = field(default=None, repr=False, compare=False)

    @property
    def pass_rate(self) -> float:
        """Share of targets that pass the null criterion."""
        return float(torch.as_tensor(self.passed, dtype=torch.float).mean())

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (no graphs; sizes instead)."""
        return _plain({
            "kind": self.kind, "layer": self.layer, "hops": self.hops, "nodes": self.nodes,
            "center": self.center, "loss": self.loss, "passed": self.passed,
            "trivial": self.trivial,
            "pass_rate": self.pass_rate, "distance": self.distance,
            "null_threshold": self.null_threshold, "twins": self.twins,
            "metrics": self.metrics, "history": self.history, "seconds": self.seconds,
            "settings": self.settings,
            "graph": {"num_nodes": self.graph.num_nodes, "num_edges": self.graph.num_edges},
        })

    def to_full_graph(self, graph: Data | None = None, target: int | None = None) -> Data:
        """The full graph with the metamer put in (SPEC §8).

        Node targets: ``graph`` (default: the graph given to ``generate``) with the receptive
        field of every target (or only of target index ``target``) replaced by the metamer's
        features and, for structure / joint metamers, its edges into R; ValueError when the
        receptive fields of the targets overlap (put them in one ``target`` at a time). The model
        gives each target the same activation on it as on ``self.graph``. Whole-graph metamers:
        ``self.graph`` itself.
        """
        if self.nodes is None:
            if target is not None:
                raise ValueError("a whole-graph metamer has no per-target receptive fields; "
                                 "call to_full_graph() without target")
            return self.graph
        graph = self.input_graph if graph is None else graph
        if graph is None:
            raise ValueError("this result does not hold the graph it was made from (loaded or "
                             "unpickled); pass it: to_full_graph(graph)")
        count = len(self.nodes)
        if target is not None and (isinstance(target, bool) or not isinstance(target, int)
                                   or not 0 <= target < count):
            raise ValueError(f"target must be None or an int in [0, {count}), got {target!r}")
        return put_in(self.graph, self.kind, graph, list(range(count)) if target is None else [target])

    def __getstate__(self) -> dict:
        """Pickled state: every field but ``input_graph`` (files never hold the full graph)."""
        return {k: v for k, v in self.__dict__.items() if k != "input_graph"}

    def save(self, path: str | Path) -> None:
        """Write the result to ``path``: graphs and tensors with ``torch.save``; a JSON summary
        beside it (``path`` with suffix ``.json``). ``input_graph`` is not written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.__getstate__(), path)
        path.with_suffix(".json").write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "MetamerResult":
        """Read a result written by :meth:`save`."""
        return cls(**torch.load(path, weights_only=False))
