"""The place where a metamer step's forward, loss and backward happen.

An *engine* maps the current inputs (features, edges, edge weights) of a problem to the
per-target activation-matching losses, differentiably. The reference engine runs the user's
model through plain PyTorch autograd; faster engines (compiled kernels over a lowered program)
implement the same interface and are chosen by ``backend=``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..graph.layers import layer_output
from ..graph.subgraph import Subgraph


def loss_scale(target: Tensor, joint: bool) -> Tensor:
    """Denominators ||H[S]||^2 of the relative loss L_act: [1] for a joint problem, else [T]
    (``target``: reference activations [T, d_l]).

    A target whose reference activation is exactly zero (e.g. every unit of a ReLU readout dead)
    has no relative loss; it gets the mean ||H||^2 of the other targets (1 when all are zero), so
    its loss is the squared error on the batch's scale instead of an overflow to inf / NaN."""
    scale = target.pow(2).sum().view(1) if joint else target.pow(2).sum(1)
    zero = scale == 0
    if bool(zero.any()):
        fallback = scale[~zero].mean() if bool((~zero).any()) else scale.new_ones(())
        scale = torch.where(zero, fallback, scale)
    return scale


class ReferenceEngine:
    """Plain PyTorch autograd through the model; works for every model and is the test oracle.

    Args:
        model: the trained model (eval mode, parameters frozen by the caller).
        layer: module name of the matched layer.
        sub: the problem's graph; its ``center`` nodes are the targets.
        target: reference activations at the targets [T, d_l].
        joint: one loss over all targets jointly (whole-graph metamer) instead of one per target.

    Every model call passes ``sub.forward_kwargs`` (the model's extra arguments, if any).
    """

    name = "reference"

    def __init__(self, model: nn.Module, layer: str, sub: Subgraph, target: Tensor, joint: bool):
        self.model, self.layer, self.sub, self.target, self.joint = model, layer, sub, target, joint
        self.scale = loss_scale(target, joint)

    def activations(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """Layer-l activations at the targets [T, d_l]."""
        out = layer_output(self.model, self.layer, x, edge_index, edge_weight, batch=self.sub.pool_batch,
                           forward_kwargs=self.sub.forward_kwargs)
        return out[self.sub.center]

    def target_outputs(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """Layer-l activations at the targets [T, d_l], differentiable w.r.t. ``x`` and the edge
        weights (here: :meth:`activations` with autograd)."""
        return self.activations(x, edge_index, edge_weight)

    def losses(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """L_act per independent problem [C] (one value, [1], for a joint whole-graph problem):
        ||H'[S] - H[S]||^2 / ||H[S]||^2."""
        diff = (self.activations(x, edge_index, edge_weight) - self.target).pow(2)
        if self.joint:
            return diff.sum().view(1) / self.scale
        return diff.sum(1) / self.scale
