"""Reference matched-layer loss: aggregation at the target rows fused with L_act and its gradient."""
from __future__ import annotations

from torch import Tensor

from .. import activations
from ..aggregate.reference import spmm


def matched_loss(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor, target: Tensor,
                 component: Tensor, scale: Tensor, bias: Tensor | None = None,
                 act: str = "none") -> tuple[Tensor, Tensor]:
    """Per-problem activation-matching loss and its gradient w.r.t. the pre-activation.

    The CSR (rowptr [T+1], col [E], weight [E]) holds only the T target rows of the layer's
    aggregation; h[t] = act(sum_e weight[e] x[col[e]] + bias) is never returned.

    Args: x [m, f]; target [T, f]; component [T] (problem of each target, in [0, C));
        scale [C] (the denominators ||H[S_c]||^2); bias [f] or None.
    Returns: (loss [C] with loss[c] = sum_{t in c} ||h[t] - target[t]||^2 / scale[c],
              grad_pre [T, f] = d sum(loss) / d pre-activation).
    """
    pre = spmm(rowptr, col, weight, x)
    if bias is not None:
        pre = pre + bias
    diff = activations.apply(pre, act) - target
    per_row = diff.pow(2).sum(1)
    loss = per_row.new_zeros(scale.numel()).index_add_(0, component, per_row) / scale
    grad_pre = 2 * diff / scale[component].unsqueeze(1) * activations.derivative(pre, act)
    return loss, grad_pre
