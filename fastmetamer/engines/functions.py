"""Autograd functions over the fused ops, so lowered programs compose with PyTorch autograd.

Each function's forward and backward call the op modules of the chosen backend (``kernels``
maps an op family name of :mod:`fastmetamer.ops.dispatch` to its backend module); gradients flow to node states, to operator values (edge
weights, for structure metamers) and, for sparse binary inputs, to the dense input features.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .csr import BinaryRows, Operator


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, value, residual, bias, op: Operator, act: str, kernels: dict):
        p = op.pattern
        out, saved = kernels["aggregate"].aggregate_forward(p.rowptr, p.col, value.detach(), x.detach(), bias, act,
                                               None if residual is None else residual.detach())
        ctx.save_for_backward(x, saved)
        ctx.op, ctx.act, ctx.kernels = op, act, kernels
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, saved = ctx.saved_tensors
        op, act, kernels = ctx.op, ctx.act, ctx.kernels
        p = op.pattern
        grad_out = grad_out.contiguous()
        grad_x = grad_value = None
        if ctx.needs_input_grad[0]:
            grad_x = kernels["aggregate"].aggregate_backward(p.t_rowptr, p.t_col, op.t_value, grad_out, saved, act)
        if ctx.needs_input_grad[1]:
            grad_value = kernels["aggregate"].edge_grad(p.rowptr, p.col, grad_out, saved, act, x.detach())
        grad_residual = grad_out if ctx.needs_input_grad[2] else None
        return grad_x, grad_value, grad_residual, None, None, None, None


def aggregate(x: Tensor, op: Operator, kernels: dict, bias: Tensor | None = None,
              act: str = "none", residual: Tensor | None = None) -> Tensor:
    """act(A x + bias) + residual with A = ``op`` [n, m], x [m, f]; returns [n, f]."""
    return _Aggregate.apply(x.contiguous(), op.value, residual, bias, op, act, kernels)


class _MatchedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, value, op: Operator, bias, act, target, component, scale, kernels):
        p = op.pattern
        loss, grad_pre = kernels["loss"].matched_loss(p.rowptr, p.col, value.detach(), x.detach(), target,
                                              component, scale, bias, act)
        ctx.save_for_backward(x, grad_pre, component)
        ctx.op, ctx.kernels = op, kernels
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, grad_pre, component = ctx.saved_tensors
        op, kernels = ctx.op, ctx.kernels
        p = op.pattern
        grad_pre = (grad_pre * grad_loss[component].unsqueeze(1)).contiguous()
        empty = grad_pre.new_empty(0)
        grad_x = grad_value = None
        if ctx.needs_input_grad[0]:
            grad_x = kernels["aggregate"].aggregate_backward(p.t_rowptr, p.t_col, op.t_value, grad_pre, empty,
                                                             "none")
        if ctx.needs_input_grad[1]:
            grad_value = kernels["aggregate"].edge_grad(p.rowptr, p.col, grad_pre, empty, "none", x.detach())
        return grad_x, grad_value, None, None, None, None, None, None, None


def matched_loss(x: Tensor, op: Operator, kernels: dict, target: Tensor, component: Tensor,
                 scale: Tensor, bias: Tensor | None = None, act: str = "none") -> Tensor:
    """Per-problem L_act [C] of the layer act(A x + bias) at the operator's rows (the targets)."""
    return _MatchedLoss.apply(x.contiguous(), op.value, op, bias, act, target, component, scale, kernels)


class _EdgeSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, weight, rowptr, kernels):
        alpha, beta = kernels["aggregate"].edge_softmax(rowptr, logits.detach().contiguous(), weight.detach())
        ctx.save_for_backward(alpha, beta, rowptr)
        ctx.kernels = kernels
        return alpha

    @staticmethod
    def backward(ctx, grad_alpha):
        alpha, beta, rowptr = ctx.saved_tensors
        grad_logits, grad_weight = ctx.kernels["aggregate"].edge_softmax_backward(rowptr, alpha, beta,
                                                                                  grad_alpha.contiguous())
        return grad_logits, grad_weight if ctx.needs_input_grad[1] else None, None, None


def edge_softmax(logits: Tensor, weight: Tensor, rowptr: Tensor, kernels: dict) -> Tensor:
    """Attention coefficients alpha [E, H]: the softmax of ``logits`` [E, H] over each CSR row
    (``rowptr`` [n + 1]) weighted by the entries' ``weight`` [E] (>= 0; 0 takes no part),
    differentiable w.r.t. both (see ``ops/aggregate/reference.py``)."""
    return _EdgeSoftmax.apply(logits, weight.contiguous(), rowptr, kernels)


class _BinaryLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, weight, x: BinaryRows, kernels):
        ones = x.ones
        unit = weight.new_ones(ones.col.numel())
        out, _ = kernels["aggregate"].aggregate_forward(ones.rowptr, ones.col, unit, weight.contiguous(), None,
                                                        "none", None)
        ctx.save_for_backward(weight)
        ctx.x, ctx.update = x, kernels["update"]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        ctx.x.add_grad(grad_out, weight, ctx.update)
        return None, None, None, None


def binary_linear(x: BinaryRows, weight: Tensor, kernels: dict) -> Tensor:
    """X' @ weight [m, f] for binary X' [m, d] given by its ones: a sparse gather-sum of weight
    [d, f] rows forward; backward adds grad[rows] @ weight^T [F, d] into ``x.grad``."""
    return _BinaryLinear.apply(x.token, weight, x, kernels)


class _BinaryDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, x: BinaryRows):
        ctx.x = x
        return x.dense()

    @staticmethod
    def backward(ctx, grad_out):
        ctx.x.add_grad(grad_out)
        return None, None


def binary_dense(x: BinaryRows) -> Tensor:
    """X' as a dense [m, d] tensor whose gradient goes into ``x.grad`` (rows ``x.rows``)."""
    return _BinaryDense.apply(x.token, x)
