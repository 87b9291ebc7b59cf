"""Grouping entries by an integer key, in PyTorch (the contract of the ``group`` op family).

``group_by(keys, num_groups) -> (rowptr, order)``: ``keys`` [E] int64 in [0, num_groups);
``rowptr`` [num_groups + 1] int64 offsets and ``order`` [E] int64 such that
``order[rowptr[g]:rowptr[g + 1]]`` are the entries with key g in ascending order (a stable
argsort). O(E log E) here; the backends do it in O(E + num_groups).
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_keys(keys: Tensor, num_groups: int) -> None:
    """Raise ValueError unless ``keys`` is a 1-D int64 tensor and ``num_groups`` a count >= 0
    (the backends check the range of the keys themselves)."""
    if not isinstance(keys, Tensor) or keys.dtype != torch.long or keys.dim() != 1:
        raise ValueError(f"keys must be a 1-D int64 tensor, got {getattr(keys, 'dtype', type(keys))} "
                         f"of shape {tuple(getattr(keys, 'shape', ()))}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")


def group_by(keys: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """(rowptr [num_groups + 1], order [E]) of ``keys`` [E] grouped by value (see the module)."""
    check_keys(keys, num_groups)
    if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= num_groups):
        raise ValueError(f"keys must lie in [0, num_groups = {num_groups})")
    rowptr = torch.zeros(num_groups + 1, dtype=torch.long, device=keys.device)
    torch.cumsum(torch.bincount(keys, minlength=num_groups), 0, out=rowptr[1:])
    return rowptr, torch.argsort(keys, stable=True)
