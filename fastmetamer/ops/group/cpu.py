"""Grouping by key on the CPU: a stable, parallel counting sort in C++ (O(E + num_groups)).

Same contract as :mod:`.reference`; the result does not depend on the thread count.
"""
from __future__ import annotations

from torch import Tensor

from .reference import check_keys

try:
    from fastmetamer import _C
except ImportError:  # extension not built: the backend reports itself unavailable
    _C = None
AVAILABLE = _C is not None and hasattr(_C, "group_by")


def group_by(keys: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """(rowptr [num_groups + 1], order [E]) of ``keys`` [E] grouped by value (see the reference)."""
    check_keys(keys, num_groups)
    if keys.device.type != "cpu":
        raise ValueError(f"keys must be on the CPU for the cpu backend, got {keys.device}")
    return _C.group_by(keys.contiguous(), num_groups)
