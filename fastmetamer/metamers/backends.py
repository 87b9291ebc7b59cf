"""Choosing the engine that runs a metamer step (``backend=``)."""
from __future__ import annotations

from torch import Tensor, nn

from .engine import ReferenceEngine
from .receptive_field import Subgraph

BACKENDS = ("auto", "reference")


def make_engine(backend: str, model: nn.Module, layer: str, sub: Subgraph, target: Tensor,
                joint: bool) -> ReferenceEngine:
    """Build the engine for ``backend`` (``"auto"``: the fastest available)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {list(BACKENDS)}")
    return ReferenceEngine(model, layer, sub, target, joint)
