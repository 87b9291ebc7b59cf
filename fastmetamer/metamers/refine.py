"""Discrete refinement of a metamer: a budget-keeping swap search after the straight-through phase.

The straight-through optimiser leaves a hard state (binary features: the ones of R; structure: the
chosen pairs of R) close to a good metamer, but it stalls where a discrete problem remains. The
refinement moves a one to a zero of the same *block* (all of R, one row in per-row mode, or one
problem's candidate pairs), so every state keeps the budget exactly. One iteration:

1. the gradient g = dL_act/d(state) at the hard state (one backward) and the Gauss-Newton
   diagonal D (computed once at the start) rank the moves to second order: switching off entry a
   and on entry b changes L_act by about g[b] - g[a] + D[a] + D[b] (exact for a linear layer but
   for the cross term);
2. every problem's best-ranked moves form the variants: each of the best ``singles`` moves alone
   (among the best ``width`` ones and zeros of every block), and the best 2, 4, 8, ... ``width``
   disjoint moves at once (wider moves pay while the first-order estimate holds);
3. every variant is evaluated exactly, all problems in one forward, and each problem keeps its
   best variant when it lowers its loss.

A problem none of whose variants improves is searched once more with many more single moves;
if that fails too it is *kicked*: a few random moves from its best state (a restart of the
search, drawn from the problem's own generator), at most ``kicks`` times. The best state seen is
returned, so the result is never worse than the start.
"""
from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

KICK_FRACTION = 0.03  # share of a problem's ones that a kick moves (at least one)
MIN_GAIN = 1e-5  # relative decrease a move must bring: float rounding never decides a move


class Moves(Protocol):
    """A discrete problem: a bool state [R, W] whose rows form blocks owned by problems.

    Rows of one problem are contiguous and in problem order; moves stay within a block. A Moves
    may also offer ``subset(ids) -> Moves | None``: the problems ``ids`` alone (rows theirs, in
    order), which lets the search drop the problems that have stopped."""

    row_block: Tensor        # [R] block of every row
    block_component: Tensor  # [B] problem owning every block
    num_components: int

    def losses(self, state: Tensor) -> Tensor: ...                   # [C] exact L_act

    def losses_of_moves(self, state: Tensor, off: Tensor, on: Tensor,
                        selections: list[Tensor]) -> Tensor: ...     # [S, C]: apply_moves(state, ...) each

    def gradient(self, state: Tensor) -> Tensor: ...                 # [R, W] dL/d(state)

    def curvature(self, state: Tensor) -> Tensor: ...                # [R, W] diagonal of the GN Hessian


def refine(moves: Moves, state: Tensor, generators: list[torch.Generator], *, iterations: int,
           kicks: int, stop_below: Tensor, restart_above: Tensor | None = None, width: int = 16,
           singles: int = 8, wide: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Swap search from ``state`` [R, W] bool; returns (best state, its losses [C], the loss
    history [iterations run, C] of the states searched).

    Each iteration tries every problem's best ``singles`` single moves and its best 2, 4, ...
    ``width`` disjoint moves at once. A problem that none of them improves is searched once more
    with its best ``wide`` single moves, then kicked (at most ``kicks`` times); when the kicks are
    spent and its best loss is still above ``restart_above`` [C], the search starts once more from
    a random state of the same budget (where the straight-through phase led to a poor region),
    else the problem is left alone. ``stop_below`` [C]: a problem stops once its loss is below it.
    ``generators``: one per problem, for the kicks and restarts.

    A problem that stops never starts again, so once at most half of the problems searched are
    still active the search goes on with those alone (``moves.subset``, where the moves offer
    it): the long tail of a few hard problems does not pay for the many finished ones."""
    loss = moves.losses(state)
    out_state, out_loss, shown = state.clone(), loss.clone(), loss.clone()
    ids = torch.arange(loss.numel(), device=loss.device)  # the problems searched
    rows = torch.arange(state.shape[0], device=loss.device)
    best_state, best_loss = state.clone(), loss.clone()
    kicks_left = torch.full_like(loss, kicks, dtype=torch.long)
    widened = torch.zeros_like(loss, dtype=torch.bool)
    restarted = torch.zeros_like(widened)
    restart_above = torch.full_like(loss, math.inf) if restart_above is None else restart_above
    row_component = moves.block_component[moves.row_block]
    active = best_loss >= stop_below
    curvature = moves.curvature(state) if bool(active.any()) else None
    history = []
    for _ in range(iterations):
        if not bool(active.any()):
            break
        if 2 * int(active.sum()) <= active.numel() and hasattr(moves, "subset"):
            keep = active.nonzero().flatten()
            narrower = moves.subset(keep)
            if narrower is not None:
                out_state[rows], out_loss[ids] = best_state, best_loss
                row_keep = active[row_component]
                moves, ids, rows, generators = narrower, ids[keep], rows[row_keep], [generators[int(c)] for c in keep]
                state, best_state, curvature = state[row_keep], best_state[row_keep], curvature[row_keep]
                loss, best_loss, kicks_left, widened, restarted, restart_above, stop_below, active = (
                    t[keep] for t in (loss, best_loss, kicks_left, widened, restarted, restart_above, stop_below,
                                      active))
                row_component = moves.block_component[moves.row_block]
        count = wide if bool(widened.any()) else singles
        off, on, valid, variants = _candidate_moves(moves.gradient(state), curvature, state, moves, count, width)
        valid &= active.unsqueeze(1)
        valid[:, singles:count] &= widened.unsqueeze(1)  # each problem's own candidate set
        trials = moves.losses_of_moves(state, off, on, [valid & v for v in variants])
        new_loss, pick = trials.min(0)
        improved = active & (new_loss < loss * (1 - MIN_GAIN))
        state = apply_moves(state, off, on, valid & variants[pick] & improved.unsqueeze(1))
        loss = torch.where(improved, new_loss, loss)
        shown[ids] = loss
        history.append(shown.clone())
        better = loss < best_loss
        best_state = torch.where(better[row_component].unsqueeze(1), state, best_state)
        best_loss = torch.minimum(loss, best_loss)
        active &= best_loss >= stop_below
        stuck = active & ~improved
        kick = stuck & widened & (kicks_left > 0)
        spent = stuck & widened & (kicks_left == 0)
        restart = spent & ~restarted & (best_loss > restart_above)
        active &= ~spent | restart
        widened = stuck & ~widened
        if bool(kick.any()):
            state = _kick(state, best_state, kick, row_component, moves.row_block, generators)
            kicks_left -= kick.long()
            loss = torch.where(kick, moves.losses(state), loss)
        if bool(restart.any()):
            state = _restart(state, restart, row_component, moves.row_block, generators)
            restarted |= restart
            kicks_left[restart] = kicks
            loss = torch.where(restart, moves.losses(state), loss)
            fresh = moves.curvature(state)
            curvature = torch.where(restart[row_component].unsqueeze(1), fresh, curvature)
    out_state[rows], out_loss[ids] = best_state, best_loss
    empty = loss.new_empty(0, out_loss.numel())
    return out_state, out_loss, torch.stack(history) if history else empty


def _candidate_moves(grad: Tensor, curvature: Tensor, state: Tensor, moves: Moves, singles: int,
                     width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every problem's candidate moves and the variants that combine them.

    Returns (entry to switch off [C, K], entry to switch on [C, K], valid [C, K], variants [V, K]
    bool): the first ``singles`` columns are the best single moves, each its own variant; the
    last ``width`` columns are disjoint moves by rank, applied as prefixes of 2, 4, ..., width."""
    blocks = moves.block_component.numel()
    off, off_gain = _block_top(torch.where(state, grad - curvature, -math.inf), moves.row_block, blocks, width)
    on, on_gain = _block_top(torch.where(state, -math.inf, -grad - curvature), moves.row_block, blocks, width)
    # estimated decrease of L for switching off[i] and on[j]: g[off] - g[on] - D[off] - D[on]
    pairs = (off_gain.unsqueeze(2) + on_gain.unsqueeze(1)).reshape(blocks, -1)
    single = _rank_per_problem(pairs, moves, singles)
    diagonal = _rank_per_problem(off_gain + on_gain, moves, width)
    grid_off = off.unsqueeze(2).expand(-1, -1, width).reshape(-1)
    grid_on = on.unsqueeze(1).expand(-1, width, -1).reshape(-1)
    off_all = torch.cat([grid_off[single[0]], off.reshape(-1)[diagonal[0]]], dim=1)
    on_all = torch.cat([grid_on[single[0]], on.reshape(-1)[diagonal[0]]], dim=1)
    valid = torch.cat([single[1], diagonal[1]], dim=1)
    return off_all, on_all, valid, _variants(singles, width, state.device)


def _rank_per_problem(gain: Tensor, moves: Moves, count: int) -> tuple[Tensor, Tensor]:
    """(positions [C, count] into ``gain`` [B, K].reshape(-1), valid [C, count]) of every
    problem's ``count`` largest finite gains over its blocks, best first."""
    owner = moves.block_component.repeat_interleave(gain.shape[1])
    pos, _ = _segment_top(gain.reshape(-1), owner, moves.num_components, count)
    valid = pos < gain.numel()
    return pos.clamp_max(gain.numel() - 1), valid


def _variants(singles: int, width: int, device) -> Tensor:
    """[V, singles + width] bool: which candidate columns each variant applies."""
    columns = torch.arange(singles + width, device=device)
    rows = [columns == j for j in range(singles)]
    size = 2
    while size <= width:
        rows.append((columns >= singles) & (columns < singles + size))
        size *= 2
    return torch.stack(rows)


def _segment_top(values: Tensor, segment: Tensor, num_segments: int, count: int) -> tuple[Tensor, Tensor]:
    """Positions [S, count] of the ``count`` largest finite ``values`` [M] of every segment (ties:
    the first position), best first, and their values; missing ones get position M and -inf.
    One stable sort by value, then one by segment: O(M log M), whatever ``count``."""
    m = values.numel()
    order = torch.argsort(-values, stable=True)  # largest first; equal values by position
    order = order[torch.argsort(segment[order], stable=True)]
    owner = segment[order]
    sizes = torch.bincount(segment, minlength=num_segments)
    rank = torch.arange(m, device=values.device) - (torch.cumsum(sizes, 0) - sizes)[owner]
    keep = (rank < count) & (values[order] > -math.inf)
    top = torch.full((num_segments, count), m, dtype=torch.long, device=values.device)
    top[owner[keep], rank[keep]] = order[keep]
    padded = torch.cat([values, values.new_full((1,), -math.inf)])
    return top, padded[top]


def _block_top(score: Tensor, row_block: Tensor, num_blocks: int, count: int) -> tuple[Tensor, Tensor]:
    """Flat entry indices [B, count] of the ``count`` largest finite scores [R, W] of every block
    (R*W where missing) and the scores: first the best per row, then the best rows' entries."""
    rows, width = score.shape
    k = min(count, width)
    values, cols = score.topk(k, dim=1)
    flat = torch.arange(rows, device=score.device).unsqueeze(1) * width + cols
    pos, best = _segment_top(values.reshape(-1), row_block.repeat_interleave(k), num_blocks, count)
    padded = torch.cat([flat.reshape(-1), flat.new_full((1,), rows * width)])
    return padded[pos], best


def apply_moves(state: Tensor, off: Tensor, on: Tensor, selected: Tensor) -> Tensor:
    """A copy of ``state`` with the selected moves applied (entries ``off`` -> 0, ``on`` -> 1)."""
    flat = state.reshape(-1).clone()
    flat[off[selected]] = False
    flat[on[selected]] = True
    return flat.view_as(state)


def _entry_ptr(row_component: Tensor, num_components: int, width: int) -> Tensor:
    """[C + 1] offsets: problem c's entries are ``ptr[c]:ptr[c+1]`` of the flattened state [R * width]
    (its rows are contiguous)."""
    counts = torch.bincount(row_component, minlength=num_components)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]) * width


def _kick(state: Tensor, best_state: Tensor, kicked: Tensor, row_component: Tensor, row_block: Tensor,
          generators: list[torch.Generator]) -> Tensor:
    """The kicked problems [C] restart from their best state moved by a few random moves."""
    state = torch.where(kicked[row_component].unsqueeze(1), best_state, state)
    width = state.shape[1]
    ptr = _entry_ptr(row_component, kicked.numel(), width)
    flat = state.view(-1)
    entry_block = row_block.repeat_interleave(width)
    for c in kicked.nonzero().flatten().tolist():
        lo, hi = int(ptr[c]), int(ptr[c + 1])
        _random_moves(flat[lo:hi], entry_block[lo:hi], generators[c])
    return state


def _restart(state: Tensor, restarted: Tensor, row_component: Tensor, row_block: Tensor,
             generators: list[torch.Generator]) -> Tensor:
    """The restarted problems [C] get a random state with every block's number of ones."""
    state = state.clone()
    width = state.shape[1]
    ptr = _entry_ptr(row_component, restarted.numel(), width)
    flat, entry_block = state.view(-1), row_block.repeat_interleave(width)
    for c in restarted.nonzero().flatten().tolist():
        lo, hi = int(ptr[c]), int(ptr[c + 1])
        flat[lo:hi] = _random_placement(flat[lo:hi], entry_block[lo:hi], generators[c])
    return state


def _random_placement(entries: Tensor, blocks: Tensor, generator: torch.Generator) -> Tensor:
    """A uniformly random bool vector with as many ones in every block as ``entries`` [N]."""
    _, block = torch.unique(blocks, return_inverse=True)
    ones = torch.bincount(block, weights=entries.double()).long()
    order = torch.randperm(entries.numel(), generator=generator).to(entries.device)
    order = order[torch.argsort(block[order], stable=True)]       # grouped by block, random inside
    first = torch.cat([ones.new_zeros(1), torch.bincount(block).cumsum(0)[:-1]])
    rank = torch.arange(entries.numel(), device=entries.device) - first[block[order]]
    placed = torch.zeros_like(entries)
    placed[order] = rank < ones[block[order]]
    return placed


def _random_moves(entries: Tensor, blocks: Tensor, generator: torch.Generator) -> None:
    """In place: switch off a few random ones (``KICK_FRACTION`` of them, at least one), each in
    turn for a uniformly random current zero of its block (the k-th in ascending order, k drawn
    from ``generator``).

    Each block keeps the sorted positions of its ones among its entries; the k-th zero is then
    k plus the number of ones before it (one binary search), so a move costs O(ones of the block)
    instead of a scan of the problem's entries."""
    ones = entries.nonzero().flatten()
    count = max(1, math.ceil(KICK_FRACTION * ones.numel()))
    chosen = ones[torch.randperm(ones.numel(), generator=generator)[:count].to(ones.device)].tolist()
    if not chosen:
        return
    block_of = blocks.cpu().numpy()
    state = entries.cpu().numpy()
    order = np.argsort(block_of, kind="stable")  # every block's entries, ascending
    bounds = np.searchsorted(block_of[order], np.unique(block_of[chosen]), side="left"), \
        np.searchsorted(block_of[order], np.unique(block_of[chosen]), side="right")
    members = {int(block_of[order[lo]]): order[lo:hi] for lo, hi in zip(*bounds)}
    ones_at = {b: np.flatnonzero(state[m]) for b, m in members.items()}  # sorted, within the block
    off, on = [], []
    for e in chosen:
        b = int(block_of[e])
        where, mine = members[b], ones_at[b]
        zeros = where.size - mine.size
        if zeros == 0:
            continue
        k = int(torch.randint(zeros, (1,), generator=generator))
        before = int(np.searchsorted(mine - np.arange(mine.size), k, side="right"))  # ones before the k-th zero
        mine = np.delete(mine, np.searchsorted(mine, np.searchsorted(where, e)))
        ones_at[b] = np.insert(mine, np.searchsorted(mine, k + before), k + before)
        off.append(e)
        on.append(int(where[k + before]))
    # an entry switched off can be switched on by a later move, never the other way round
    entries[torch.tensor(off, dtype=torch.long, device=entries.device)] = False
    entries[torch.tensor(on, dtype=torch.long, device=entries.device)] = True
