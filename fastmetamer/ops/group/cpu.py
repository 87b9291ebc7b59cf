"""Grouping by key on the CPU: a stable, parallel counting sort in C++ (O(E + num_groups)).

Same contract as :mod:`.reference`; the result does not depend on the thread count.
"""
from __future__ import annotations

from torch import Tensor

from .reference import check_in_edges, check_keys

try:
    from fastmetamer import _C
except ImportError:  # extension not built: the backend reports itself unavailable
    _C = None
AVAILABLE = _C is not None and hasattr(_C, "append_node_entries")


def group_by(keys: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """(rowptr [num_groups + 1], order [E]) of ``keys`` [E] grouped by value (see the reference)."""
    check_keys(keys, num_groups)
    if keys.device.type != "cpu":
        raise ValueError(f"keys must be on the CPU for the cpu backend, got {keys.device}")
    return _C.group_by(keys.contiguous(), num_groups)


def append_node_entries(rowptr: Tensor, source: Tensor, edge_id: Tensor,
                        node_col: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rowptr [n + 1], col [E + n], order [E + n]): the in-edge CSR with one entry per node
    appended to each row (see the reference), rows written in parallel."""
    check_in_edges(rowptr, source, edge_id, node_col)
    if rowptr.device.type != "cpu":
        raise ValueError(f"the in-edge CSR must be on the CPU for the cpu backend, got {rowptr.device}")
    return _C.append_node_entries(rowptr.contiguous(), source.contiguous(), edge_id.contiguous(),
                                  node_col.contiguous())
