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

from ..graph.neighbourhood import InEdges, expand_ranges
from ..ops import dispatch


@dataclass
class Pattern:
    """Sparsity pattern of an operator given as coordinate lists (row [E], col [E]).

    ``order`` sorts entries by row (CSR); ``t_order`` sorts them by column (the transpose's CSR,
    None for a forward-only pattern, which needs no backward).
    """

    num_rows: int
    num_cols: int
    rowptr: Tensor
    col: Tensor
    order: Tensor
    t_rowptr: Tensor | None
    t_col: Tensor | None
    t_order: Tensor | None

    @classmethod
    def from_coo(cls, row: Tensor, col: Tensor, num_rows: int, num_cols: int,
                 transpose: bool = True) -> "Pattern":
        """Build the pattern of the entries (row[e], col[e]); ``transpose=False`` skips the
        transpose (one sort and one gather less: forward passes only)."""
        rowptr, order = dispatch.group_by(row, num_rows)
        return cls._with_transpose(num_rows, num_cols, rowptr, col.index_select(0, order), order, row, col,
                                   transpose)

    @classmethod
    def from_in_edges(cls, in_edges: InEdges, node_col: Tensor, num_cols: int,
                      coordinates: tuple[Tensor, Tensor] | None = None) -> "Pattern":
        """The pattern of an operator whose entries are a graph's edges followed by one entry per
        node (node i's entry in column ``node_col[i]``, [n]). Equal to :meth:`from_coo` of its
        coordinates, but the CSR comes from the graph's cached in-edge CSR ``in_edges`` (each
        row: its in-edges in edge order, then its node's entry) with O(E + n) sequential writes
        instead of a sort. ``coordinates``: (row, col) [E + n] each (row = [destination of every
        edge, 0 .. n-1], col = [source of every edge, node_col]), given to build the transpose
        too; None for a forward-only pattern."""
        n, num_edges = in_edges.num_nodes, in_edges.source.numel()
        if node_col.shape != (n,):
            raise ValueError(f"node_col must hold one column per node ({n}), got {tuple(node_col.shape)}")
        rowptr, csr_col, order = dispatch.append_node_entries(in_edges.rowptr, in_edges.source, in_edges.edge_id,
                                                              node_col.contiguous())
        if coordinates is None:
            return cls(n, num_cols, rowptr, csr_col, order, None, None, None)
        row, col = coordinates
        if row.shape != (num_edges + n,) or col.shape != row.shape:
            raise ValueError(f"row and col must hold the {num_edges} edges and {n} node entries, "
                             f"got {tuple(row.shape)} and {tuple(col.shape)}")
        return cls._with_transpose(n, num_cols, rowptr, csr_col, order, row, col, True)

    @classmethod
    def identity(cls, n: int, transpose: bool = True, device=None) -> "Pattern":
        """The pattern of the identity [n, n]: one entry per node, coordinate i = node i (a
        dense layer between message-passing ones, as an operator)."""
        nodes = torch.arange(n, device=device)
        ptr = torch.arange(n + 1, device=device)
        if not transpose:
            return cls(n, n, ptr, nodes, nodes, None, None, None)
        return cls(n, n, ptr, nodes, nodes, ptr, nodes, nodes)

    @classmethod
    def _with_transpose(cls, num_rows: int, num_cols: int, rowptr: Tensor, csr_col: Tensor, order: Tensor,
                        row: Tensor, col: Tensor, transpose: bool) -> "Pattern":
        """The pattern from its CSR, plus the transpose's CSR of the coordinates when asked."""
        if not transpose:
            return cls(num_rows, num_cols, rowptr, csr_col, order, None, None, None)
        t_rowptr, t_order = dispatch.group_by(col, num_cols)
        return cls(num_rows, num_cols, rowptr, csr_col, order, t_rowptr, row.index_select(0, t_order), t_order)

    def submatrix(self, rows: Tensor, cols: Tensor, stacked: bool = False) -> "Pattern":
        """The operator's rows ``rows`` [r] (in that order) with its columns renumbered to their
        positions in ``cols`` [c] (ascending ids; every column the rows use must be there). A
        ``stacked`` operator [A | I] acts on [x W; x W_r]: its columns n + j become c + the
        position of j. ``order`` / ``t_order`` keep indexing this pattern's coordinate entries,
        so the same coordinate values build the sub-operator (:meth:`Operator.build`)."""
        owner, entry, node, root = self._entries_of(rows, stacked)
        position = torch.searchsorted(cols, node) + root * cols.numel()
        sub = Pattern.from_coo(owner, position, rows.numel(), cols.numel() * (2 if stacked else 1),
                               transpose=self.t_order is not None)
        coo_entry = self.order[entry]
        sub.order = coo_entry[sub.order]
        if sub.t_order is not None:
            sub.t_order = coo_entry[sub.t_order]
        return sub

    def columns_of(self, rows: Tensor, stacked: bool = False) -> Tensor:
        """The nodes [c] (ascending) that rows ``rows`` read: their columns, a stacked operator's
        columns n + j counted as node j."""
        return torch.unique(self._entries_of(rows, stacked)[2])

    def _entries_of(self, rows: Tensor, stacked: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The entries of ``rows`` [r]: (owner [M]: index into rows, entry [M]: CSR position,
        node [M]: the node each column reads, root [M]: a stacked operator's I part)."""
        half = self.num_cols // 2 if stacked else self.num_cols
        owner, entry = expand_ranges(self.rowptr[rows], self.rowptr[rows + 1] - self.rowptr[rows])
        column = self.col[entry]
        root = column >= half
        return owner, entry, torch.where(root, column - half, column), root


@dataclass
class BinaryRows:
    """Binary node features X' [m, d] given by their ones, for the fast engine's first layer.

    Only rows ``rows`` [F] (sorted local ids; None: all m rows) are optimised; their gradient
    dL/dX'[rows] [F, d] is written into the caller's buffer ``grad`` during backward (reused
    every step: no fresh allocation of a large dense gradient), and ``token``, a scalar leaf that
    requires grad, is autograd's handle on it. Gradients of other rows are not computed: that is
    exact when those rows lie outside the matched rows' receptive field (the frozen boundary
    ring), whose features never reach them.

    Attributes: num_rows (m), width (d); rowptr, col: the CSR of the ones, over all m rows, or
    over ``rows`` alone when ``compact`` (every other row is zero: nothing of size m is built
    until :attr:`ones` asks for it); rows, grad, token; written (False until a backward wrote
    ``grad``; later contributions add to it); defer, pending (with ``defer``, the first
    contribution given as a product grad @ W^T is only recorded in ``pending`` = (grad [F, f], W
    [d, f], update op module), for the fused update to form one cache-sized tile at a time).
    """

    num_rows: int
    width: int
    rowptr: Tensor
    col: Tensor
    rows: Tensor | None
    grad: Tensor
    token: Tensor
    compact: bool = False
    written: bool = False
    parent: "BinaryRows | None" = None
    defer: bool = False
    pending: tuple | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_rows, self.width

    @property
    def ones(self) -> Pattern:
        """The pattern [m, d] of the ones over all m rows (forward only)."""
        rowptr = self.rowptr
        if self.compact:
            counts = rowptr.new_zeros(self.num_rows).index_copy_(0, self.rows, rowptr.diff())
            rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        empty = self.col.new_empty(0)
        return Pattern(self.num_rows, self.width, rowptr, self.col, empty, empty, empty, empty)

    @classmethod
    def from_csr(cls, rowptr: Tensor, col: Tensor, rows: Tensor | None, num_rows: int, grad: Tensor,
                 token: Tensor, frozen: tuple[Tensor, Tensor] | None = None, defer: bool = False) -> "BinaryRows":
        """Wrap the ones of the F optimised rows (``rowptr`` [F + 1], ``col`` [nnz]) placed at
        local ``rows`` [F] of an m-row graph; ``frozen`` (row [n1], col [n1]) adds the ones of
        other rows, which get no gradient (needed when they can reach the matched rows, e.g.
        when the edges change too). ``defer``: see the class."""
        width = grad.shape[1]
        if frozen is None:
            return cls(num_rows, width, rowptr, col, rows, grad, token, compact=rows is not None, defer=defer)
        local = torch.arange(rowptr.numel() - 1, device=col.device) if rows is None else rows
        row = torch.repeat_interleave(local, rowptr.diff())
        row, col = torch.cat([row, frozen[0]]), torch.cat([col, frozen[1]])
        order = torch.argsort(row * width + col)
        return cls(num_rows, width, row_offsets(row, num_rows), col[order], rows, grad, token, defer=defer)

    def restrict(self, keep: Tensor) -> "BinaryRows | None":
        """Rows ``keep`` [k] (ascending local ids) as a k-row BinaryRows that writes into this
        one's gradient buffer; None unless every optimised row is kept. O(k + F) when compact."""
        rows = torch.arange(self.shape[0], device=keep.device) if self.rows is None else self.rows
        position = torch.searchsorted(keep, rows)
        if rows.numel() and (int(position.max()) >= keep.numel() or not torch.equal(keep[position], rows)):
            return None
        if self.compact:  # the ones all lie in the optimised rows, which are all kept
            counts = torch.zeros_like(keep).index_copy_(0, position, self.rowptr.diff())
            col = self.col
        else:
            counts = self.rowptr[keep + 1] - self.rowptr[keep]
            col = self.col if int(counts.sum()) == self.col.numel() else \
                self.col[expand_ranges(self.rowptr[keep], counts)[1]]
        rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return BinaryRows(keep.numel(), self.width, rowptr, col, position, self.grad, self.token, parent=self)

    def add_grad(self, grad_rows: Tensor, weight: Tensor | None = None, update=None) -> None:
        """Add dL/dX'[rows] given either directly (``grad_rows`` [m, d]) or as the gradient
        [m, f] of X' @ ``weight`` [d, f] (one GEMM into the buffer, by ``update``, the backend's
        update op module: its ``linear_input_grad``). With ``defer``, a first contribution given
        as a product is recorded in ``pending`` instead; any later contribution forms it first."""
        owner = self if self.parent is None else self.parent
        if self.rows is not None:
            grad_rows = grad_rows.index_select(0, self.rows)
        if weight is not None and owner.defer and not owner.written and owner.pending is None:
            owner.pending = (grad_rows.contiguous(), weight.contiguous(), update)
            return
        owner.form_pending()
        if weight is None:
            if owner.written:
                self.grad.add_(grad_rows)
            else:
                self.grad.copy_(grad_rows)
        else:
            update.linear_input_grad(self.grad, grad_rows.contiguous(), weight.contiguous(), owner.written)
        owner.written = True

    def form_pending(self) -> None:
        """Form the recorded product gradient (:attr:`pending`) into the buffer."""
        if self.pending is not None:
            grad_rows, weight, update = self.pending
            self.pending = None
            update.linear_input_grad(self.grad, grad_rows, weight, False)
            self.written = True

    def dense(self) -> Tensor:
        """X' as a dense [m, d] 0/1 tensor (for layers that need it, e.g. a residual)."""
        ones = self.ones
        row = torch.repeat_interleave(torch.arange(self.shape[0], device=ones.col.device), ones.rowptr.diff())
        return self.grad.new_zeros(self.shape).index_put_((row, ones.col), self.grad.new_ones(ones.col.numel()))


def row_offsets(index: Tensor, size: int) -> Tensor:
    """CSR offsets [size + 1] of the entries whose rows are ``index`` [M] (any order)."""
    ptr = torch.zeros(size + 1, dtype=torch.long, device=index.device)
    ptr[1:] = torch.bincount(index, minlength=size).cumsum(0)
    return ptr


@dataclass
class Operator:
    """A pattern with values for this step: ``value`` [E] in CSR order, ``t_value`` in the
    transpose's order (``t_value`` is detached: gradients flow through ``value`` only; None for a
    forward-only pattern)."""

    pattern: Pattern
    value: Tensor
    t_value: Tensor | None

    @classmethod
    def build(cls, pattern: Pattern, coo_value: Tensor) -> "Operator":
        """Gather coordinate-order values [E_coo] into CSR and transposed-CSR order."""
        t_value = None if pattern.t_order is None else coo_value.detach().index_select(0, pattern.t_order)
        return cls(pattern, coo_value.index_select(0, pattern.order), t_value)
