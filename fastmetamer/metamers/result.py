"""``MetamerResult``: what ``fastmetamer.generate`` returns."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import Data


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
        history: L_act before each step: [steps] for one problem, [steps, T] for several.
        passed: the null-distribution criterion: bool, or [T] (per node for a whole graph).
        distance: ||h' - h|| per target [T] (the quantity the criterion compares).
        null_threshold: per target [T], the smallest distance of another real node.
        twins: per target [T], the number of real nodes with identical activation.
        metrics: activation / feature / structure distances (floats, or lists per target).
        kind, layer, hops, nodes: what was asked (nodes: original ids, None = whole graph).
        seconds: wall time of the optimisation.
        settings: the resolved options.
    """

    graph: Data
    reference: Data
    center: int | Tensor
    loss: float | Tensor
    history: Tensor
    passed: bool | Tensor
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

    @property
    def pass_rate(self) -> float:
        """Share of targets that pass the null criterion."""
        return float(torch.as_tensor(self.passed, dtype=torch.float).mean())

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (no graphs; sizes instead)."""
        return _plain({
            "kind": self.kind, "layer": self.layer, "hops": self.hops, "nodes": self.nodes,
            "center": self.center, "loss": self.loss, "passed": self.passed,
            "pass_rate": self.pass_rate, "distance": self.distance,
            "null_threshold": self.null_threshold, "twins": self.twins,
            "metrics": self.metrics, "history": self.history, "seconds": self.seconds,
            "settings": self.settings,
            "graph": {"num_nodes": self.graph.num_nodes, "num_edges": self.graph.num_edges},
        })

    def save(self, path: str | Path) -> None:
        """Write the result to ``path``: graphs and tensors with ``torch.save``; a JSON summary
        beside it (``path`` with suffix ``.json``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.__dict__, path)
        path.with_suffix(".json").write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "MetamerResult":
        """Read a result written by :meth:`save`."""
        return cls(**torch.load(path, weights_only=False))
