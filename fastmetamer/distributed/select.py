"""Distributed top-k selection over values spread across the ranks (SPEC §10: the top-rho
threshold of a partitioned whole-graph metamer).

Every rank holds some entries of one flat array, each with its *global position*. The k largest
entries are selected exactly as one process's stable descending sort would select them (ties go
to the smaller global position), by bisection on the values' order-preserving integer keys with
one ``all_reduce`` of a count per halving: O(log) collectives of one number each and
O(N log N) local work, instead of gathering the values."""
from __future__ import annotations

import torch
from torch import Tensor

_ALL = torch.distributed.ReduceOp if torch.distributed.is_available() else None


def top_k(values: Tensor, position: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The global top-``k`` of the float32 ``values`` [N] held by this rank (global positions
    ``position`` [N], int64, distinct across ranks).

    Returns ``(selected [N] bool, threshold)``: whether each local entry is among the k largest
    of all ranks' entries, and the scalar threshold midway between the k-th and the (k+1)-th
    largest (max + 1e-6 when k <= 0, min - 1e-6 when k >= the total count), equal on every rank."""
    total = _sum(values.numel())
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool), _extreme(values, "max") + 1e-6
    if k >= total:
        return torch.ones_like(values, dtype=torch.bool), _extreme(values, "min") - 1e-6
    keys = _order_keys(values)
    ascending = torch.sort(keys).values
    kth = _kth_largest_key(ascending, k)
    above = keys > kth
    tied = keys == kth
    selected = above
    wanted = k - _sum(int(above.sum()))
    if _sum(int(tied.sum())) > wanted:  # ties straddle the cut: the smallest positions win
        tied_positions = torch.sort(position[tied]).values
        last = _kth_smallest(tied_positions, wanted)
        selected = above | (tied & (position <= last))
    else:
        selected = above | tied
    kth_value = _extreme(values[tied], "max")
    next_value = _extreme(values[~selected], "max")
    return selected, 0.5 * (kth_value + next_value)


def _order_keys(values: Tensor) -> Tensor:
    """int64 keys [N] in the order of the float32 ``values`` (-0.0 and 0.0 equal)."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _kth_largest_key(ascending: Tensor, k: int) -> int:
    """The largest key t with at least k keys >= t over all ranks (local keys sorted ascending)."""
    low, high = int(_extreme(ascending, "min")), int(_extreme(ascending, "max"))
    while low < high:  # invariant: count(>= low) >= k, count(>= high + 1) < k
        middle = (low + high + 1) // 2
        at_least = ascending.numel() - int(torch.searchsorted(ascending, middle))
        if _sum(at_least) >= k:
            low = middle
        else:
            high = middle - 1
    return low


def _kth_smallest(ascending: Tensor, k: int) -> int:
    """The k-th smallest of the int64 values held by all ranks (local values sorted ascending)."""
    low, high = int(_extreme(ascending, "min")), int(_extreme(ascending, "max"))
    while low < high:  # invariant: count(<= high) >= k, count(<= low - 1) < k
        middle = (low + high) // 2
        if _sum(int(torch.searchsorted(ascending, middle, right=True))) >= k:
            high = middle
        else:
            low = middle + 1
    return low


def _extreme(values: Tensor, how: str) -> Tensor:
    """The max / min over every rank of ``values`` (float32 or int64; a rank may hold none):
    a 0-d tensor of that dtype (-inf / inf, or the int64 bounds, when no rank holds any)."""
    largest = how == "max"
    if values.numel():
        local = (values.max() if largest else values.min()).reshape(1).clone()
    elif values.dtype.is_floating_point:
        local = torch.tensor([float("-inf") if largest else float("inf")], dtype=values.dtype)
    else:
        bound = torch.iinfo(values.dtype)
        local = torch.tensor([bound.min if largest else bound.max], dtype=values.dtype)
    if _world() > 1:
        torch.distributed.all_reduce(local, op=_ALL.MAX if largest else _ALL.MIN)
    return local[0]


def _sum(count: int) -> int:
    """Sum of an int over the ranks."""
    value = torch.tensor([count], dtype=torch.int64)
    if _world() > 1:
        torch.distributed.all_reduce(value)
    return int(value)


def _world() -> int:
    from . import world

    return world()[1]
