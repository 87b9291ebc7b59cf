"""Compressed sparse row (CSR) operators for the fused kernels, with their cached transposes.

An operator A [n, m] acts on node states: (A x)[i] = sum_e value[e] * x[col[e]] over row i. The
sparsity pattern and the sort orders that produce the CSR and its transpose are computed once per
edge list; only the values (which may carry gradients, e.g. edge weights of a structure metamer)
are re-gathered each step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Pattern:
    """Sparsity pattern of an operator given as coordinate lists (row [E], col [E]).

    ``order`` sorts entries by row (CSR); ``t_order`` sorts them by column (the transpose's CSR).
    """

    num_rows: int
    num_cols: int
    rowptr: Tensor
    col: Tensor
    order: Tensor
    t_rowptr: Tensor
    t_col: Tensor
    t_order: Tensor

    @classmethod
    def from_coo(cls, row: Tensor, col: Tensor, num_rows: int, num_cols: int) -> "Pattern":
        """Build the pattern of the entries (row[e], col[e])."""
        order = torch.argsort(row, stable=True)
        t_order = torch.argsort(col, stable=True)
        return cls(num_rows, num_cols, _rowptr(row, num_rows), col[order].contiguous(), order,
                   _rowptr(col, num_cols), row[t_order].contiguous(), t_order)

    def rows(self, rows: Tensor) -> "Pattern":
        """The sub-operator made of the given rows [T] (in that order)."""
        starts, ends = self.rowptr[rows], self.rowptr[rows + 1]
        counts = ends - starts
        entry = torch.repeat_interleave(starts - torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]]),
                                        counts) + torch.arange(int(counts.sum()))
        new_row = torch.repeat_interleave(torch.arange(rows.numel()), counts)
        coo_entry = self.order[entry]
        sub = Pattern.from_coo(new_row, self.col[entry], rows.numel(), self.num_cols)
        sub.order = coo_entry[sub.order]
        sub.t_order = coo_entry[sub.t_order]
        return sub


def _rowptr(index: Tensor, size: int) -> Tensor:
    ptr = torch.zeros(size + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(index, minlength=size).cumsum(0)
    return ptr


@dataclass
class Operator:
    """A pattern with values for this step: ``value`` [E] in CSR order, ``t_value`` in the
    transpose's order (``t_value`` is detached: gradients flow through ``value`` only)."""

    pattern: Pattern
    value: Tensor
    t_value: Tensor

    @classmethod
    def build(cls, pattern: Pattern, coo_value: Tensor) -> "Operator":
        """Gather coordinate-order values [E_coo] into CSR and transposed-CSR order."""
        return cls(pattern, coo_value[pattern.order].contiguous(),
                   coo_value.detach()[pattern.t_order].contiguous())
