"""Distributed top-k selection over values spread across the ranks (SPEC §10: the top-rho
threshold of a partitioned whole-graph metamer).

Every rank holds some entries of one flat array, each with its *global position*. The k largest
entries are selected exactly as one process's stable descending sort would select them (ties go
to the smaller global position), by bisection on the values' order-preserving integer keys with
one ``all_reduce`` of a count per halving: O(log) collectives of one number each and
O(N + k log(range)) local work, instead of gathering the values."""
from __future__ import annotations

import struct
from typing import Callable

import torch
from torch import Tensor

_ALL = torch.distributed.ReduceOp if torch.distributed.is_available() else None


def top_k(values: Tensor, node_ids: Tensor, k: int, score: Callable[[Tensor], Tensor] | None = None,
          chunk: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """The global top-``k`` of ``score(values)`` over every rank's entries, this rank holding
    ``values`` [R, d] of the nodes ``node_ids`` [R] (distinct across ranks): entry (r, j) has global
    position ``node_ids[r] * d + j``, the order ties are broken in. ``score`` is a non-decreasing
    elementwise map to float32 (e.g. a sigmoid; None: the values themselves).

    Returns ``(selected, threshold)``: the flat indices (ascending) of this rank's entries among
    the k largest scores of all ranks, and the scalar threshold midway between the k-th and the
    (k+1)-th largest score (max + 1e-6 when k <= 0, min - 1e-6 when k >= the total count), equal
    on every rank. Memory O(k + chunk) beyond ``values``: only a rank's k + 1 largest values can be
    selected, and they are found before any score is computed."""
    flat = values.reshape(-1)
    scored = (lambda t: t.float()) if score is None else score
    total = _sum(flat.numel(), flat.device)
    if k <= 0:
        return flat.new_zeros(0, dtype=torch.long), _scored_extreme(flat, scored, "max") + 1e-6
    if k >= total:
        return torch.arange(flat.numel(), device=flat.device), _scored_extreme(flat, scored, "min") - 1e-6
    raw, index = _candidates(flat, k + 1)  # index ascending
    candidates = scored(raw)
    del raw
    kth_value = _kth_largest(candidates, k)
    above = candidates > kth_value  # every entry scored above the k-th is a candidate
    complete = candidates.numel() == flat.numel() or bool(candidates.min() < kth_value)
    if complete:  # the candidates reach below the k-th: all its ties are among them
        tied = (candidates == kth_value).nonzero().flatten()
        tied_index = index[tied]
    else:  # this rank's candidates may cut its ties: find them all
        tied_index = _scored_equal(flat, scored, kth_value, chunk)
    wanted = k - _sum(int(above.sum()), flat.device)
    keep = slice(None)
    if _sum(tied_index.numel(), flat.device) > wanted:  # ties straddle the cut: the smallest positions win
        width = values.shape[1] if values.dim() > 1 else 1
        position = node_ids[tied_index // width] * width + tied_index % width
        keep = position <= _kth_smallest(torch.sort(position).values, wanted)
        next_value = kth_value
    else:
        next_value = _extreme(candidates[candidates < kth_value], "max")
    threshold = 0.5 * (kth_value + next_value)
    if complete:
        above[tied[keep]] = True
        return index[above], threshold
    return torch.sort(torch.cat([index[above], tied_index[keep]])).values, threshold


#: Entries sampled to place the pivot of :func:`_candidates`, and how many more entries than
#: needed it aims to let through.
PIVOT_SAMPLE, PIVOT_MARGIN = 1 << 16, 1.5


def _candidates(flat: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(values, indices ascending) of a superset of the ``count`` largest entries of ``flat``: every entry at
    or above a pivot placed, from an evenly spread sample, so that about 1.5x ``count`` entries
    pass (one pass over ``flat``, where ``torch.topk`` sorts); ``torch.topk`` when the pivot lets
    too few through. Any such superset gives the same selection."""
    n = flat.numel()
    if count >= n:
        return flat, torch.arange(n, device=flat.device)
    spread = torch.arange(min(n, PIVOT_SAMPLE), device=flat.device) * 1_000_003 % n  # a prime stride
    share = min(1.0, PIVOT_MARGIN * count / n + 1e-3)
    pivot = torch.quantile(flat[spread].float(), 1.0 - share)
    index = (flat >= pivot).nonzero().flatten()
    if index.numel() < count:
        index = torch.sort(torch.topk(flat, count, sorted=False).indices).values
    return flat[index], index


def _scored_extreme(flat: Tensor, scored, how: str) -> Tensor:
    """The max / min score over every rank (the score of the max / min value: it is monotone)."""
    local = (flat.max() if how == "max" else flat.min()).view(1) if flat.numel() else flat.new_zeros(0)
    return _extreme(scored(local), how)


def _scored_equal(flat: Tensor, scored, value: Tensor, chunk: int) -> Tensor:
    """Indices (ascending) of the entries of ``flat`` whose score equals ``value``, scored
    ``chunk`` entries at a time."""
    parts = [(scored(flat[start:start + chunk]) == value).nonzero().flatten() + start
             for start in range(0, flat.numel(), chunk)]
    return torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.long)


def _key(value: float) -> int:
    """An integer key of a float32 in the order of the floats (-0.0 and 0.0 alike)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return -(bits & 0x7FFFFFFF) if bits & 0x80000000 else bits


def _value(key: int, device: torch.device) -> Tensor:
    """The float32 (0-d tensor on ``device``) of an integer :func:`_key`."""
    bits = key if key >= 0 else 0x80000000 | -key
    return torch.tensor(struct.unpack("<f", struct.pack("<I", bits))[0], dtype=torch.float32, device=device)


def _kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest of the float32 ``values`` held by all ranks, by bisection on their integer
    keys (one count per halving): the largest value t with at least k values >= t."""
    low, high = _key(float(_extreme(values, "min"))), _key(float(_extreme(values, "max")))
    while low < high:  # invariant: count(>= low) >= k, count(>= high + 1) < k
        middle = (low + high + 1) // 2
        if _sum(int((values >= _value(middle, values.device)).sum()), values.device) >= k:
            low = middle
        else:
            high = middle - 1
    return _value(low, values.device)


def _kth_smallest(ascending: Tensor, k: int) -> int:
    """The k-th smallest of the int64 values held by all ranks (local values sorted ascending)."""
    low, high = int(_extreme(ascending, "min")), int(_extreme(ascending, "max"))
    while low < high:  # invariant: count(<= high) >= k, count(<= low - 1) < k
        middle = (low + high) // 2
        if _sum(int(torch.searchsorted(ascending, middle, right=True)), ascending.device) >= k:
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
        local = torch.tensor([float("-inf") if largest else float("inf")], dtype=values.dtype, device=values.device)
    else:
        bound = torch.iinfo(values.dtype)
        local = torch.tensor([bound.min if largest else bound.max], dtype=values.dtype, device=values.device)
    if _world() > 1:
        torch.distributed.all_reduce(local, op=_ALL.MAX if largest else _ALL.MIN)
    return local[0]


def _sum(count: int, device: torch.device) -> int:
    """Sum of an int over the ranks."""
    value = torch.tensor([count], dtype=torch.int64, device=device)  # NCCL reduces device tensors
    if _world() > 1:
        torch.distributed.all_reduce(value)
    return int(value)


def _world() -> int:
    from . import world

    return world()[1]
