"""Activation functions the fused kernels know, their derivatives, and the saved-state format.

Backward needs the activation's derivative at the pre-activation. What a forward op saves:
``relu`` -> one bit per element (uint8 [n, ceil(f/8)], bit ``j % 8`` of byte ``j // 8`` set
when pre[i, j] > 0); ``none`` -> nothing (an empty tensor); any other -> the pre-activation
[n, f] (float32).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = ("none", "relu", "elu", "leaky_relu", "tanh", "gelu")
LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default negative slope
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}


def check_activation(act: str) -> int:
    """Return the integer code of ``act`` (the kernels' enum), or raise ValueError."""
    if act not in ACT_CODES:
        raise ValueError(f"unsupported activation {act!r}; fused kernels support {list(ACTIVATIONS)}")
    return ACT_CODES[act]


def apply(pre: Tensor, act: str, inplace: bool = False) -> Tensor:
    """act(pre), elementwise; ``inplace``: overwrite ``pre`` where the activation can (a fresh
    tensor that autograd does not need: saves allocating, and page-faulting, another one)."""
    if act == "none":
        return pre
    if act == "relu":
        return torch.relu_(pre) if inplace else torch.relu(pre)
    if act == "elu":
        return torch.nn.functional.elu(pre, inplace=inplace)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(pre, LEAKY_SLOPE, inplace=inplace)
    if act == "tanh":
        return torch.tanh_(pre) if inplace else torch.tanh(pre)
    return torch.nn.functional.gelu(pre)


def derivative(pre: Tensor, act: str) -> Tensor:
    """act'(pre), elementwise (the subgradient 0 at 0 for relu, as autograd uses)."""
    if act == "none":
        return torch.ones_like(pre)
    if act == "relu":
        return (pre > 0).to(pre.dtype)
    if act == "elu":
        return torch.where(pre > 0, torch.ones_like(pre), torch.exp(pre))
    if act == "leaky_relu":
        return torch.where(pre > 0, torch.ones_like(pre), torch.full_like(pre, LEAKY_SLOPE))
    if act == "tanh":
        return 1 - torch.tanh(pre) ** 2
    cdf = 0.5 * (1 + torch.erf(pre / math.sqrt(2)))
    return cdf + pre * torch.exp(-0.5 * pre * pre) / math.sqrt(2 * math.pi)


def pack_bits(positive: Tensor) -> Tensor:
    """Pack a bool [n, f] into uint8 [n, ceil(f/8)] (bit j%8 of byte j//8)."""
    n, f = positive.shape
    padded = torch.zeros(n, -(-f // 8) * 8, dtype=torch.uint8, device=positive.device)
    padded[:, :f] = positive.to(torch.uint8)
    weights = 2 ** torch.arange(8, dtype=torch.uint8, device=positive.device)
    return (padded.view(n, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, f: int) -> Tensor:
    """Inverse of :func:`pack_bits`: bool [n, f]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).view(bits.shape[0], -1)[:, :f].bool()


def save_for_backward(pre: Tensor, act: str) -> Tensor:
    """What a forward op keeps for the backward pass (see the module docstring)."""
    if act == "none":
        return pre.new_empty(0)
    if act == "relu":
        return pack_bits(pre > 0)
    return pre


def saved_derivative(saved: Tensor, act: str, shape: tuple[int, int]) -> Tensor:
    """act'(pre) [n, f] recovered from the saved state."""
    if act == "none":
        return torch.ones(shape, device=saved.device)
    if act == "relu":
        return unpack_bits(saved, shape[1]).float()
    return derivative(saved, act)
