"""Private helpers shared by the analysis metrics: input checks and the 1-D Wasserstein distance.

All metrics compute in float64 on their inputs' device, whatever the inputs' dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..validation import all_finite


def to_float64(x, name: str) -> Tensor:
    """Return ``x`` as a detached float64 tensor on its device (a list: on the CPU); ValueError if
    it holds NaN or Inf."""
    t = torch.as_tensor(x, dtype=torch.float64).detach()
    if not all_finite(t):
        raise ValueError(f"{name} contains NaN or Inf values; metrics need finite input")
    return t


def same_shape_pair(a, ref, names: tuple[str, str] = ("a", "ref")) -> tuple[Tensor, Tensor]:
    """Convert ``a`` and ``ref`` to float64 and check that they are non-empty and of equal shape."""
    a, ref = to_float64(a, names[0]), to_float64(ref, names[1])
    if a.shape != ref.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(ref.shape)}")
    if a.numel() == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty; metrics need at least one entry")
    return a, ref


def require_dim(t: Tensor, dim: int, name: str, layout: str) -> None:
    """Raise ValueError unless ``t`` has ``dim`` dimensions (``layout`` names them, e.g. '[n, d]')."""
    if t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor {layout}, got shape {tuple(t.shape)}")


def check_edge_index(edge_index, num_nodes: int | None, name: str) -> Tensor:
    """Return ``edge_index`` as a long tensor after checking shape [2, E], integer dtype, id range.

    With ``num_nodes=None`` only non-negativity of the ids is checked.
    """
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"{name} must be a tensor of shape [2, num_edges], got {type(edge_index).__name__}")
    if edge_index.dtype.is_floating_point or edge_index.dtype.is_complex or edge_index.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (torch.long), got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"{name} must have shape [2, num_edges], got {tuple(edge_index.shape)}")
    edge_index = edge_index.detach().to(device="cpu", dtype=torch.long)
    if edge_index.numel() and edge_index.min() < 0:
        raise ValueError(f"{name} contains negative node ids")
    if num_nodes is not None and edge_index.numel() and edge_index.max() >= num_nodes:
        raise ValueError(f"{name} contains node id {int(edge_index.max())} but the graph has "
                         f"{num_nodes} nodes (ids must lie in [0, {num_nodes}))")
    return edge_index


def check_num_nodes(num_nodes, name: str) -> int:
    """Return ``num_nodes`` as an int after checking that it is a positive integer."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"{name} must be a positive int (graphs need at least one node), got {num_nodes!r}")
    return num_nodes


def wasserstein1_columns(x: Tensor, ref: Tensor) -> Tensor:
    """Exact 1-D Wasserstein-1 distance between the value distributions of matching columns.

    ``x`` [n, d] and ``ref`` [m, d] (float64, n and m may differ) -> [d]. Each column is an
    empirical distribution with mass 1/n (1/m) per row; W1 = ∫_0^1 |F_x^{-1}(u) - F_ref^{-1}(u)| du.
    The quantile functions are step functions with breakpoints k/n and k/m; the merged breakpoints
    are handled in integer units of 1/(n·m), so the result is exact. When n == m this reduces to
    the mean absolute difference of the sorted columns.
    """
    n, m = x.shape[0], ref.shape[0]
    xs, rs = x.sort(dim=0).values, ref.sort(dim=0).values
    ends = torch.unique(torch.cat([torch.arange(1, n + 1, device=x.device) * m,
                                   torch.arange(1, m + 1, device=x.device) * n]))
    widths = torch.diff(ends, prepend=ends.new_zeros(1)).to(torch.float64) / (n * m)
    ix, ir = (ends + m - 1) // m - 1, (ends + n - 1) // n - 1
    return (widths[:, None] * (xs[ix] - rs[ir]).abs()).sum(dim=0)


def average_ranks(a: Tensor) -> Tensor:
    """Ranks 1..d of every row of ``a`` [T, d], ties sharing their average rank (as
    ``scipy.stats.rankdata``)."""
    values, order = a.sort(dim=1, stable=True)
    rows, d = a.shape
    new_group = torch.ones_like(values, dtype=torch.bool)
    new_group[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new_group.long().cumsum(1) - 1 + torch.arange(rows, device=a.device).unsqueeze(1) * d  # unique per row
    position = torch.arange(1, d + 1, dtype=a.dtype, device=a.device).expand(rows, d).reshape(-1)
    first = a.new_full((rows * d,), math.inf).scatter_reduce(0, group.reshape(-1), position, "amin")
    last = a.new_zeros(rows * d).scatter_reduce(0, group.reshape(-1), position, "amax")
    sorted_ranks = ((first + last) / 2)[group.reshape(-1)].view(rows, d)
    return torch.empty_like(sorted_ranks).scatter_(1, order, sorted_ranks)
