"""Reference fused update of binary straight-through features: top-rho selection and Adam.

Features are parameterised by logits theta [F, d]; P = sigmoid(slope * theta); the model sees
the hard top-k mask of P per block of rows (a problem, or a single row in per-row mode). The
gradient the update reads comes from the first layer x @ W (:func:`linear_input_grad`).
"""
from __future__ import annotations

import torch
from torch import Tensor


def top_mask(theta: Tensor, ptr: Tensor, k: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """Hard mask of the k[c] largest entries of each row block and the threshold between them.

    Ties at the k-th value are taken in memory (row-major) order within the block, as the
    compiled backends take them, so every backend selects the same entries from the same P.

    Args: theta [F, d]; ptr [C+1] row offsets of the blocks; k [C] ones per block; slope s.
    Returns: (hard [F, d] float 0/1, threshold [F]: for every row, its block's
        t = (P_(k) + P_(k+1)) / 2 with P_(j) the j-th largest of P = sigmoid(s theta) in the
        block; max P + 1e-6 when k = 0 and min P - 1e-6 when k = block size).
    """
    hard = torch.zeros_like(theta)
    threshold = theta.new_empty(theta.shape[0])
    for c in range(ptr.numel() - 1):
        lo, hi = int(ptr[c]), int(ptr[c + 1])
        if hi == lo:
            continue
        prob = torch.sigmoid(slope * theta[lo:hi]).reshape(-1)
        kc = int(k[c])
        if kc <= 0:
            t = prob.max() + 1e-6
        elif kc >= prob.numel():
            hard[lo:hi] = 1.0
            t = prob.min() - 1e-6
        else:
            values, order = torch.sort(prob, descending=True, stable=True)  # ties in memory order
            hard[lo:hi].view(-1)[order[:kc]] = 1.0
            t = 0.5 * (values[kc - 1] + values[kc])
        threshold[lo:hi] = t
    return hard, threshold


def top_mask_csr(theta: Tensor, ptr: Tensor, k: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """The ones of :func:`top_mask`'s mask in CSR form, without the dense mask.

    Returns: (rowptr [F + 1], col [nnz] column of each one, row by row in increasing column
        order, threshold [F]), all int64 but the float threshold.
    """
    hard, threshold = top_mask(theta, ptr, k, slope)
    return mask_to_csr(hard) + (threshold,)


def mask_to_csr(hard: Tensor) -> tuple[Tensor, Tensor]:
    """(rowptr [F + 1], col [nnz]) of the non-zero entries of a mask [F, d], row by row."""
    row, col = hard.nonzero().unbind(1)
    rowptr = torch.zeros(hard.shape[0] + 1, dtype=torch.long, device=hard.device)
    rowptr[1:] = torch.bincount(row, minlength=hard.shape[0]).cumsum(0)
    return rowptr, col


def linear_input_grad(out: Tensor, grad: Tensor, weight: Tensor, accumulate: bool) -> None:
    """The gradient of the first layer x @ ``weight`` with respect to x, in place: ``out`` [F, d]
    = ``grad`` [F, f] @ ``weight``^T (``weight`` [d, f]), or added to ``out`` when ``accumulate``."""
    if accumulate:
        out.addmm_(grad, weight.t())
    else:
        torch.mm(grad, weight.t(), out=out)


def total_grad(grad_x: Tensor | None, grad_product: tuple[Tensor, Tensor] | None, theta: Tensor) -> Tensor:
    """dL/dX' [F, d] (theta's shape): ``grad_x`` (None: zero) plus grad_rows @ weight^T when
    ``grad_product`` = (grad_rows [F, f], weight [d, f]) is given."""
    if grad_product is None:
        return torch.zeros_like(theta) if grad_x is None else grad_x
    grad_rows, weight = grad_product
    return torch.mm(grad_rows, weight.t()) if grad_x is None else torch.addmm(grad_x, grad_rows, weight.t())


def adam_ste_update(theta: Tensor, grad_x: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor, *,
                    step: int, lr: float, beta1: float, beta2: float, eps: float, slope: float,
                    threshold: Tensor, margin: float, margin_scale: Tensor, active: Tensor,
                    bound: float | None = None, grad_product: tuple[Tensor, Tensor] | None = None) -> None:
    """One fused straight-through + margin + Adam step, in place on theta, exp_avg, exp_avg_sq.

    With P = sigmoid(s theta), t the row's threshold and G = dL/dX' = grad_x (None: zero) +
    grad_rows @ weight^T where ``grad_product`` = (grad_rows [F, f], weight [d, f]) is given (the
    first layer's gradient, :func:`linear_input_grad`, left for the update to form):
      dL/dP = G + margin_scale[row] * (-sign(P - t)) * [|P - t| < margin]
      g = dL/dP * s P (1 - P);  m, v <- Adam moments of g (every row);
      theta -= active[row] * lr * m_hat / (sqrt(v_hat) + eps), with bias-corrected m_hat, v_hat
      (``step`` counts from 1);
      theta <- clamp(theta, -bound, bound) on every row, active or not (the projection of
      :meth:`fastmetamer.metamers.features.FeatureParam.project`: bound = LOGIT_BOUND / s keeps
      |s theta| <= LOGIT_BOUND so P never saturates). NaN stays NaN, as in ``torch.clamp``.
    Args: theta, grad_x, exp_avg, exp_avg_sq [F, d]; threshold, margin_scale [F]; active [F] bool;
        bound >= 0 (the value in theta's dtype is the clamp limit; None or inf: no clamp).
    """
    bound = check_bound(bound)
    grad_x = total_grad(grad_x, grad_product, theta)
    prob = torch.sigmoid(slope * theta)
    gap = prob - threshold.unsqueeze(1)
    near = (gap.abs() < margin).to(theta.dtype)
    grad_prob = grad_x - margin_scale.unsqueeze(1) * torch.sign(gap) * near
    grad = grad_prob * slope * prob * (1 - prob)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(eps)
    update = (exp_avg / (1 - beta1 ** step)) / denom
    theta.sub_(lr * active.to(theta.dtype).unsqueeze(1) * update)
    if bound != float("inf"):
        theta.clamp_(-bound, bound)


def check_bound(bound: float | None) -> float:
    """``bound`` as a float (None: inf); ValueError unless it is >= 0 (NaN refused)."""
    bound = float("inf") if bound is None else float(bound)
    if not bound >= 0:
        raise ValueError(f"bound must be >= 0 (or None / inf for no clamp), got {bound}")
    return bound
