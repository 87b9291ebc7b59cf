"""Engines: where a metamer step's forward, loss and backward run.

- :class:`ReferenceEngine`: plain PyTorch autograd through the user's model (the oracle).
- :class:`FastEngine`: the model lowered to a program of fused ops on one backend.

:func:`make_engine` is the single place that chooses between them.
"""
from __future__ import annotations

import warnings

from torch import Tensor, nn

from ..graph.subgraph import Subgraph
from ..ops import dispatch
from .fast import FastEngine
from .lowering import Unsupported, lower
from .passes import full_graph_activations
from .reference import ReferenceEngine, loss_scale

__all__ = ["FastEngine", "ReferenceEngine", "make_engine", "lower", "Unsupported", "loss_scale",
           "full_graph_activations"]


def make_engine(backend: str, model: nn.Module, layer: str, sub: Subgraph, target: Tensor,
                joint: bool) -> ReferenceEngine | FastEngine:
    """The engine for ``backend`` (``"auto"``: the fastest available; ``"reference"``: autograd).

    A model or layer the fast engine cannot lower, or extra forward arguments
    (``sub.forward_kwargs``: lowered programs do not read them), fall back to the reference engine
    with one warning."""
    concrete = dispatch.resolve(backend, sub.x.device)
    if concrete == "reference":
        return ReferenceEngine(model, layer, sub, target, joint)
    if sub.forward_kwargs:
        warnings.warn(f"fastmetamer fast engine: forward_kwargs {sorted(sub.forward_kwargs)} are "
                      "not lowered; using the reference engine", stacklevel=3)
        return ReferenceEngine(model, layer, sub, target, joint)
    try:
        program = lower(model, layer)
    except Unsupported as err:
        warnings.warn(f"fastmetamer fast engine: {err}; using the reference engine", stacklevel=3)
        return ReferenceEngine(model, layer, sub, target, joint)
    return FastEngine(program, concrete, model, sub, target, joint)
