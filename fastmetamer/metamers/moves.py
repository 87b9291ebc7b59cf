"""The discrete problems that :func:`~fastmetamer.metamers.refine.refine` searches.

- :class:`FeatureMoves`: binary features of the free rows, state [F, d] (ones of R; blocks are
  the problems' receptive fields, or single rows in per-row mode).
- :class:`StructureMoves`: the edges among R, state [P, 1] over candidate pairs (blocks are the
  problems); the budget B of every problem stays fixed.

Both evaluate L_act exactly at hard states through the problem's engine, many states in one
forward over disjoint copies of the problem graph (:class:`_Copies`), and give the gradient with
respect to the state's entries (the first-order ranking of moves).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..engines import FastEngine, make_engine
from ..engines.csr import BinaryRows, row_offsets
from ..graph.subgraph import Subgraph
from ..ops.update.reference import mask_to_csr
from .refine import apply_moves
from .structure import StructureParam


COPY_ENTRIES = 1 << 24  # node features x copies held at once when states are evaluated together
MAX_COPIES = 16


class _Copies:
    """An engine over ``copies`` disjoint copies of the problem graph ``sub`` with edges
    ``edge_index`` [2, E] (weights ``edge_weight`` [E] or None): one forward gives the losses of that
    many states of every problem. ``engine`` is None where that is not possible (not
    ``copyable``: a loss shared by many targets, a pooled layer that cannot pool copies apart;
    extra forward arguments); ``width``: features per node held per copy."""

    def __init__(self, engine, sub: Subgraph, edge_index: Tensor, edge_weight: Tensor | None,
                 copyable: bool, width: int):
        self.copies = max(1, min(MAX_COPIES, COPY_ENTRIES // max(1, sub.num_nodes * width)))
        self.sub = sub
        self.engine = None
        if not copyable or sub.forward_kwargs or self.copies == 1:
            return
        k, m = self.copies, sub.num_nodes
        copy = torch.arange(k, device=edge_index.device)
        targets = m if sub.pool_batch is None else int(sub.pool_batch.max()) + 1
        self.edge_index = edge_index.repeat(1, k) + copy.repeat_interleave(edge_index.shape[1]) * m
        self.edge_weight = None if edge_weight is None else edge_weight.repeat(k)
        copies = Subgraph(
            x=sub.x.new_zeros(1, sub.x.shape[1]).expand(k * m, -1),  # shape only: inputs come per call
            edge_index=self.edge_index, edge_weight=self.edge_weight, node_ids=sub.node_ids.repeat(k),
            free=sub.free.repeat(k),
            component=sub.component.repeat(k) + copy.repeat_interleave(m) * sub.num_components,
            center=(sub.center.unsqueeze(0) + copy.unsqueeze(1) * targets).reshape(-1),
            num_components=k * sub.num_components,
            pool_batch=None if sub.pool_batch is None else sub.pool_batch.repeat(k) + copy.repeat_interleave(m) * targets)
        self.free_rows = copies.free.nonzero().flatten()
        self.num_nodes = k * m
        self.engine = make_engine(engine.name, engine.model, engine.layer, copies,
                                  engine.target.repeat(k, 1), joint=False)

    def chunks(self, states: list[Tensor]) -> list[list[Tensor]]:
        """``states`` in groups of ``copies`` (the last one padded with its last state)."""
        groups = [states[i:i + self.copies] for i in range(0, len(states), self.copies)]
        groups[-1] = groups[-1] + [groups[-1][-1]] * (self.copies - len(groups[-1]))
        return groups

    def split(self, losses: Tensor, count: int) -> Tensor:
        """[groups * copies * C] losses -> [count, C]."""
        return losses.view(-1, self.sub.num_components)[:count]


class FeatureMoves:
    """Binary features of ``sub``'s free rows with the edges fixed to ``edge_index`` / ``edge_weight``.

    ``by_ones``: feed the fast engine the features by their ones (exact only while the edges are
    the subgraph's own: the frozen ring then never reaches the targets)."""

    def __init__(self, engine, sub: Subgraph, edge_index: Tensor, edge_weight: Tensor | None,
                 per_row: bool, by_ones: bool, shared_loss: bool, copyable: bool):
        self.engine, self.sub, self.edge_index, self.edge_weight = engine, sub, edge_index, edge_weight
        self.options = dict(per_row=per_row, by_ones=by_ones, shared_loss=shared_loss, copyable=copyable)
        self.free_rows = sub.free.nonzero().flatten()
        component = sub.component[sub.free]
        self.num_components = sub.num_components
        if per_row:
            self.row_block, self.block_component = torch.arange(component.numel(), device=component.device), component
        else:
            self.row_block = component
            self.block_component = torch.arange(sub.num_components, device=component.device)
        self.by_ones = by_ones and isinstance(engine, FastEngine)
        if self.by_ones:
            self.grad = sub.x.new_zeros(self.free_rows.numel(), sub.x.shape[1])
            self.token = sub.x.new_zeros((), requires_grad=True)
        self.shared_loss, self.row_component = shared_loss, component
        own_edges = edge_index is sub.edge_index and edge_weight is sub.edge_weight
        self.copies = _Copies(engine, sub, edge_index, edge_weight, copyable and own_edges,
                              1 if self.by_ones else sub.x.shape[1])

    def subset(self, ids: Tensor) -> "FeatureMoves | None":
        """The problems ``ids`` [K] (ascending) alone, on their own smaller graph and engine (rows:
        theirs, in order); None where that is not possible (a shared loss, edges other than the
        problem graph's own, pooling or extra forward arguments)."""
        sub = self.sub
        own_edges = self.edge_index is sub.edge_index and self.edge_weight is sub.edge_weight
        if self.shared_loss or not own_edges or sub.pool_batch is not None or sub.forward_kwargs:
            return None
        part = sub.select_components(ids)
        targets = torch.isin(sub.component[sub.center], ids)
        engine = make_engine(self.engine.name, self.engine.model, self.engine.layer, part,
                             self.engine.target[targets], joint=False)
        return FeatureMoves(engine, part, part.edge_index, part.edge_weight, **self.options)

    def features(self, state: Tensor) -> Tensor:
        """The problem graph's features [m, d] with the free rows set to ``state``."""
        x = self.sub.x.clone()
        x[self.free_rows] = state.to(x.dtype)
        return x

    def _input(self, state: Tensor, rows: Tensor | None = None, num_nodes: int | None = None):
        if not self.by_ones:
            return self.features(state)
        rowptr, col = mask_to_csr(state)
        if num_nodes is None:
            rows, num_nodes = (None if bool(self.sub.free.all()) else self.free_rows), self.sub.num_nodes
        grad = self.grad if rows is None or rows is self.free_rows else self.grad.new_zeros(0, state.shape[1])
        return BinaryRows.from_csr(rowptr, col, rows, num_nodes, grad, self.token)

    def losses(self, state: Tensor) -> Tensor:
        """[C] L_act of the hard state [F, d]."""
        with torch.no_grad():
            return self.engine.losses(self._input(state), self.edge_index, self.edge_weight)

    def losses_of_moves(self, state: Tensor, off: Tensor, on: Tensor, selections: list[Tensor]) -> Tensor:
        """[S, C] L_act of ``state`` [F, d] with each selection [*] of the moves (entries ``off``
        -> 0, ``on`` -> 1) applied. By ones, a group of copies is built from the state's ones and
        the moved entries only (O(S nnz), not O(S F d))."""
        copies = self.copies
        if copies.engine is None or not self.by_ones:
            return self.losses_many([apply_moves(state, off, on, chosen) for chosen in selections])
        base = state.reshape(-1).nonzero().flatten()
        out = []
        with torch.no_grad():
            for group in copies.chunks(selections):
                rowptr, col = _ones_of_copies(base, state.shape, off, on, group)
                x = BinaryRows.from_csr(rowptr, col, copies.free_rows, copies.num_nodes,
                                        self.grad.new_zeros(0, state.shape[1]), self.token)
                out.append(copies.engine.losses(x, copies.edge_index, copies.edge_weight))
        return copies.split(torch.cat(out), len(selections))

    def losses_many(self, states: list[Tensor]) -> Tensor:
        """[S, C] L_act of every hard state [F, d] of ``states``."""
        copies = self.copies
        if copies.engine is None:
            return torch.stack([self.losses(state) for state in states])
        out = []
        with torch.no_grad():
            for group in copies.chunks(states):
                if self.by_ones:
                    x = self._input(torch.cat(group), copies.free_rows, copies.num_nodes)
                else:
                    x = torch.cat([self.features(state) for state in group])
                out.append(copies.engine.losses(x, copies.edge_index, copies.edge_weight))
        return copies.split(torch.cat(out), len(states))

    def gradient(self, state: Tensor) -> Tensor:
        """[F, d] dL_act/dX' of the free rows at the hard state (summed over problems)."""
        x = self._input(state)
        if self.by_ones:
            self.engine.losses(x, self.edge_index, self.edge_weight).sum().backward()
            return self.grad.clone() if x.written else torch.zeros_like(self.grad)
        x.requires_grad_(True)
        self.engine.losses(x, self.edge_index, self.edge_weight).sum().backward()
        return x.grad[self.free_rows]


    def curvature(self, state: Tensor) -> Tensor:
        """[F, d] Gauss-Newton diagonal of L_act in every entry at ``state`` (zero for a loss shared
        by many targets, where it would need one backward per target)."""
        if self.shared_loss:
            return torch.zeros(state.shape, device=state.device)
        if self.by_ones:  # the gradients of the free rows only, written into the BinaryRows buffer
            squares = _squared_jacobian_by_ones(self._input(state), self.engine, self.edge_index, self.edge_weight)
        else:
            x = self.features(state).requires_grad_(True)
            outputs = self.engine.target_outputs(x, self.edge_index, self.edge_weight)
            squares = _squared_jacobian(outputs, x)[self.free_rows]
        return squares / self.engine.scale[self.row_component].unsqueeze(1)


class StructureMoves:
    """The chosen pairs among R of every problem, over candidate pairs: all pairs of R (dense) or
    the last block of :class:`StructureParam` plus the pairs of the starting state (sparse).

    ``x``: the features the model sees [m, d]; ``chosen``: the starting pairs [sum B, 2]."""

    def __init__(self, engine, sub: Subgraph, struct: StructureParam, x: Tensor, chosen: Tensor,
                 shared_loss: bool, copyable: bool):
        self.engine, self.x, self.num_components = engine, x, sub.num_components
        self.shared_loss = shared_loss
        owner = struct.state_owner
        pairs = [_candidates(part.nodes[part.pairs].t(), chosen[owner == c], sub.num_nodes)
                 for c, part in enumerate(struct.parts)]
        self.pairs = torch.cat(pairs)
        self.block_component = torch.arange(len(pairs), device=chosen.device)
        self.row_block = torch.repeat_interleave(self.block_component,
                                                 torch.tensor([p.shape[0] for p in pairs], device=chosen.device))
        key = self.pairs[:, 0] * sub.num_nodes + self.pairs[:, 1]
        self.start = torch.isin(key, chosen[:, 0] * sub.num_nodes + chosen[:, 1]).unsqueeze(1)
        self.index = torch.cat([struct.fixed_index, self.pairs.t(), self.pairs.t().flip(0)], dim=1)
        fixed = struct.fixed_weight
        self.fixed_weight = x.new_ones(struct.fixed_index.shape[1]) if fixed is None else fixed
        self.copies = _Copies(engine, sub, self.index, None, copyable, x.shape[1])
        if self.copies.engine is not None:
            self.x_copies = x.repeat(self.copies.copies, 1)

    def _weights(self, on: Tensor) -> Tensor:
        return torch.cat([self.fixed_weight, on, on])

    def losses(self, state: Tensor) -> Tensor:
        """[C] L_act with the candidate pairs of ``state`` [P, 1] on (weight 1) and the rest off (0)."""
        with torch.no_grad():
            return self.engine.losses(self.x, self.index, self._weights(state[:, 0].float()))

    def losses_of_moves(self, state: Tensor, off: Tensor, on: Tensor, selections: list[Tensor]) -> Tensor:
        """[S, C] L_act of ``state`` with each selection of the moves applied."""
        return self.losses_many([apply_moves(state, off, on, chosen) for chosen in selections])

    def losses_many(self, states: list[Tensor]) -> Tensor:
        """[S, C] L_act of every state [P, 1] of ``states``."""
        copies = self.copies
        if copies.engine is None:
            return torch.stack([self.losses(state) for state in states])
        with torch.no_grad():
            out = [copies.engine.losses(self.x_copies, copies.edge_index,
                                        torch.cat([self._weights(state[:, 0].float()) for state in group]))
                   for group in copies.chunks(states)]
        return copies.split(torch.cat(out), len(states))

    def gradient(self, state: Tensor) -> Tensor:
        """[P, 1] dL_act/d(weight of each candidate pair) at the hard state (both directions)."""
        on = state[:, 0].float().requires_grad_(True)
        self.engine.losses(self.x, self.index, self._weights(on)).sum().backward()
        return on.grad.unsqueeze(1)

    def curvature(self, state: Tensor) -> Tensor:
        """[P, 1] Gauss-Newton diagonal of L_act in every pair's weight (zero for a shared loss)."""
        if self.shared_loss:
            return torch.zeros(state.shape, device=state.device)
        on = state[:, 0].float().requires_grad_(True)
        outputs = self.engine.target_outputs(self.x, self.index, self._weights(on))
        squares = _squared_jacobian(outputs, on)
        return (squares / self.engine.scale[self.row_block]).unsqueeze(1)

    def chosen(self, state: Tensor) -> Tensor:
        """The pairs [sum B, 2] that are on, problem by problem."""
        return self.pairs[state[:, 0]]


def _ones_of_copies(base: Tensor, shape: torch.Size, off: Tensor, on: Tensor,
                    selections: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(rowptr [S R + 1], col) of S stacked copies of a bool state [R, W] whose ones are at the
    flat indices ``base`` (ascending), copy s with ``off[selections[s]]`` -> 0 and then
    ``on[selections[s]]`` -> 1: equal to ``mask_to_csr`` of the stacked edited states."""
    rows, width = shape
    size = rows * width
    copies = len(selections)
    keep = torch.ones(copies, base.numel(), dtype=torch.bool, device=base.device)
    added = []
    for s, chosen in enumerate(selections):
        gone = off[chosen]
        if base.numel():
            at = torch.searchsorted(base, gone).clamp_max(base.numel() - 1)
            keep[s, at[base[at] == gone]] = False
        added.append(on[chosen] + s * size)
    kept = (base.unsqueeze(0) + torch.arange(copies, device=base.device).unsqueeze(1) * size)[keep]  # ascending
    keys = _insert_sorted(kept, torch.unique(torch.cat(added)))
    return row_offsets(keys // width, copies * rows), keys % width


def _insert_sorted(keys: Tensor, new: Tensor) -> Tensor:
    """The union of the ascending distinct ``keys`` [K] and ``new`` [N], ascending, in O(K + N log K)
    (the few new keys are placed, the many old ones never sorted again)."""
    if new.numel() == 0:
        return keys
    at = torch.searchsorted(keys, new)
    present = (at < keys.numel()) & (keys[at.clamp_max(max(keys.numel() - 1, 0))] == new) if keys.numel() else \
        torch.zeros_like(new, dtype=torch.bool)
    new, at = new[~present], at[~present]
    slot = at + torch.arange(new.numel(), device=new.device)
    out = keys.new_empty(keys.numel() + new.numel())
    old = torch.ones(out.numel(), dtype=torch.bool, device=new.device)
    old[slot] = False
    out[slot] = new
    out[old] = keys
    return out


def _squared_jacobian(h: Tensor, inputs: Tensor) -> Tensor:
    """sum_k (d sum_t h[t, k] / d inputs)^2 for target outputs ``h`` [T, d_l]: per input entry, the
    sum of its squared Jacobian entries when every entry reaches one target only."""
    total = torch.zeros_like(inputs)
    for k in range(h.shape[1]):
        (grad,) = torch.autograd.grad(h[:, k].sum(), inputs, retain_graph=k + 1 < h.shape[1], allow_unused=True)
        if grad is not None:
            total += grad.detach() ** 2
    return total.detach()


def _squared_jacobian_by_ones(x: BinaryRows, engine: FastEngine, edge_index: Tensor,
                              edge_weight: Tensor | None) -> Tensor:
    """:func:`_squared_jacobian` for binary features given by their ones: the gradient of the
    optimised rows [F, d] only, through the lowered program's rows that reach the targets (no
    dense copy of the problem graph's features)."""
    h = engine.target_outputs(x, edge_index, edge_weight)
    total = torch.zeros_like(x.grad)
    for k in range(h.shape[1]):
        x.written = False
        h[:, k].sum().backward(retain_graph=k + 1 < h.shape[1])
        if x.written:
            total.add_(x.grad ** 2)
    return total


def _candidates(candidates: Tensor, chosen: Tensor, num_nodes: int) -> Tensor:
    """Distinct pairs [P, 2] of ``candidates`` and ``chosen`` (both [*, 2], row < col), sorted."""
    both = torch.cat([candidates, chosen])
    key = torch.unique(both[:, 0] * num_nodes + both[:, 1])
    return torch.stack([key // num_nodes, key % num_nodes], dim=1)
