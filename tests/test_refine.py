"""The discrete swap search (fastmetamer.metamers.refine) on toy problems with known answers."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmetamer.metamers import refine as refine_module
from fastmetamer.metamers.refine import apply_moves, refine


class QuadraticMoves:
    """Problems L_c(s) = ||A_c s_c - t_c||^2 (or linear c_c . s_c) over bool states [R, W]; rows of
    problem c are ``ptr[c]:ptr[c+1]``; blocks are whole problems or single rows."""

    def __init__(self, sizes, width, seed, linear=False, per_row=False):
        gen = torch.Generator().manual_seed(seed)
        self.sizes, self.width, self.linear, self.per_row = sizes, width, linear, per_row
        self.num_components = len(sizes)
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self.ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(sizes).cumsum(0)])
        if per_row:
            self.row_block, self.block_component = torch.arange(owner.numel()), owner
        else:
            self.row_block, self.block_component = owner, torch.arange(len(sizes))
        self.A = [torch.randn(5, n * width, generator=gen, dtype=torch.float64) for n in sizes]
        self.t = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in sizes]
        self.c = [torch.randn(n * width, generator=gen, dtype=torch.float64) for n in sizes]

    def _loss(self, c, s):
        s = s.reshape(-1).double()
        if self.linear:
            return self.c[c] @ s
        return (self.A[c] @ s - self.t[c]).pow(2).sum()

    def losses(self, state):
        return torch.stack([self._loss(c, state[self.ptr[c]:self.ptr[c + 1]])
                            for c in range(self.num_components)]).float()

    def gradient(self, state):
        s = state.double().requires_grad_(True)
        sum(self._loss(c, s[self.ptr[c]:self.ptr[c + 1]]) for c in range(self.num_components)).backward()
        return s.grad.float()


def _start(sizes, width, ones, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in sizes:
        flat = torch.zeros(n * width, dtype=torch.bool)
        flat[torch.randperm(n * width, generator=gen)[:ones]] = True
        rows.append(flat.view(n, width))
    return torch.cat(rows)


def _generators(count, seed=0):
    return [torch.Generator().manual_seed(seed + c) for c in range(count)]


def _run(moves, state, iterations=50, kicks=3):
    stop = torch.full((moves.num_components,), -1.0)
    return refine(moves, state, _generators(moves.num_components), iterations=iterations, kicks=kicks,
                  stop_below=stop)


def test_linear_objective_reaches_the_exact_optimum():
    """With a linear loss the first-order ranking is exact: the search must find the k smallest costs."""
    moves = QuadraticMoves([4, 3], width=5, seed=1, linear=True)
    state = _start([4, 3], 5, ones=6, seed=2)
    found, loss, _ = _run(moves, state)
    for c in range(2):
        rows = found[moves.ptr[c]:moves.ptr[c + 1]].reshape(-1)
        best = moves.c[c].topk(6, largest=False).values.sum()
        assert rows.sum() == 6
        torch.testing.assert_close(loss[c].double(), best, rtol=1e-5, atol=1e-6)


def test_budget_kept_never_worse_and_history_consistent():
    moves = QuadraticMoves([3, 5, 2], width=4, seed=3)
    state = _start([3, 5, 2], 4, ones=4, seed=4)
    start_loss = moves.losses(state)
    found, loss, history = _run(moves, state)
    assert (loss <= start_loss).all()
    torch.testing.assert_close(moves.losses(found), loss)
    for c in range(3):
        assert found[moves.ptr[c]:moves.ptr[c + 1]].sum() == 4
    assert history.shape[1] == 3 and (history.min(0).values >= loss - 1e-6).all()


def test_small_problem_reaches_the_brute_force_optimum():
    """10 entries, 3 ones: the search with kicks finds the global optimum of every problem (checked
    against all 120 states; the problems and draws are fixed, so this is deterministic)."""
    sizes = [5, 5, 5, 5]
    moves = QuadraticMoves(sizes, width=2, seed=5)
    found, loss, _ = _run(moves, _start(sizes, 2, ones=3, seed=6), iterations=100, kicks=10)
    for c in range(len(sizes)):
        best = min(float(moves._loss(c, _state_of(ones, 10)))
                   for ones in itertools.combinations(range(10), 3))
        assert float(loss[c]) <= best + 1e-5


def _state_of(ones, size):
    s = torch.zeros(size, dtype=torch.bool)
    s[list(ones)] = True
    return s


def test_per_row_blocks_keep_every_rows_count():
    moves = QuadraticMoves([3, 4], width=6, seed=7, per_row=True)
    state = _start([3, 4], 6, ones=8, seed=8)
    found, loss, _ = _run(moves, state)
    assert torch.equal(found.sum(1), state.sum(1))
    assert (loss <= moves.losses(state)).all()


def test_batched_problems_equal_single_ones():
    """Each problem's search depends on its own data and generator only."""
    sizes = [4, 6]
    moves = QuadraticMoves(sizes, width=3, seed=9)
    state = _start(sizes, 3, ones=5, seed=10)
    found, loss, _ = _run(moves, state)
    for c in range(2):
        alone = QuadraticMoves([sizes[c]], width=3, seed=9)
        alone.A, alone.t = [moves.A[c]], [moves.t[c]]
        rows = slice(int(moves.ptr[c]), int(moves.ptr[c + 1]))
        stop = torch.full((1,), -1.0)
        one, one_loss, _ = refine(alone, state[rows], [torch.Generator().manual_seed(c)], iterations=50,
                                  kicks=3, stop_below=stop)
        assert torch.equal(one, found[rows])
        assert float(one_loss[0]) == float(loss[c])


class NarrowingMoves(QuadraticMoves):
    """QuadraticMoves that offer ``subset``: the search may go on with the active problems alone."""

    calls = 0

    def subset(self, ids):
        NarrowingMoves.calls += 1
        part = QuadraticMoves.__new__(NarrowingMoves)
        part.width, part.linear, part.per_row, part.num_components = self.width, self.linear, self.per_row, ids.numel()
        part.sizes = [self.sizes[c] for c in ids.tolist()]
        part.A, part.t, part.c = ([values[c] for c in ids.tolist()] for values in (self.A, self.t, self.c))
        owner = torch.repeat_interleave(torch.arange(ids.numel()), torch.tensor(part.sizes))
        part.ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(part.sizes).cumsum(0)])
        if self.per_row:
            part.row_block, part.block_component = torch.arange(owner.numel()), owner
        else:
            part.row_block, part.block_component = owner, torch.arange(ids.numel())
        return part


@pytest.mark.parametrize("per_row", [False, True])
def test_search_narrowed_to_active_problems_equals_the_full_search(per_row):
    """Once most problems have stopped, the search goes on with the active ones alone: states,
    losses and history equal those of the search that keeps every problem."""
    sizes = [3, 5, 2, 4, 4, 3, 5, 2]
    full = QuadraticMoves(sizes, width=4, seed=11, per_row=per_row)
    narrowing = NarrowingMoves(sizes, width=4, seed=11, per_row=per_row)
    state = _start(sizes, 4, ones=4, seed=12)
    start = full.losses(state)
    stop = torch.where(torch.arange(len(sizes)) % 4 == 0, torch.full_like(start, -1.0), start * 0.9)
    runs = []
    for moves in (full, narrowing):
        runs.append(refine(moves, state, _generators(len(sizes)), iterations=60, kicks=2, stop_below=stop))
    NarrowingMoves.calls = 0
    refine(narrowing, state, _generators(len(sizes)), iterations=60, kicks=2, stop_below=stop)
    assert NarrowingMoves.calls >= 1
    for got, want in zip(runs[1], runs[0]):
        assert torch.equal(got, want)


def _losses_of_moves(self, state, off, on, selections):
    return torch.stack([self.losses(apply_moves(state, off, on, chosen)) for chosen in selections])


QuadraticMoves.losses_of_moves = _losses_of_moves


def _curvature(self, state):
    """Exact Hessian diagonal / 2 of the toy losses (zero for the linear ones)."""
    if self.linear:
        return torch.zeros(state.shape)
    return torch.cat([self.A[c].pow(2).sum(0).view(-1, self.width).float() for c in range(self.num_components)])


QuadraticMoves.curvature = _curvature


def test_swap_search_runs_by_default_for_node_targets_not_for_a_whole_graph():
    """refine_steps=None: the search follows the straight-through phase of node targets, not of a
    whole-graph metamer (one loss over every node) unless asked for; asked, it never does worse."""
    import fastmetamer as fm
    from conftest import awkward_graph

    graph = awkward_graph(num_nodes=30, num_features=10, seed=5, binary=True)
    torch.manual_seed(0)
    model = fm.models.GCN(10, 3, hidden=8, depth=2).eval()
    options = dict(steps=20, progress=False, scores=False)
    node = fm.generate(model, graph, 4, **options)
    whole = fm.generate(model, graph, None, **options)
    searched = fm.generate(model, graph, None, refine_steps=5, **options)
    assert node.history.shape[0] > 20 and whole.history.shape[0] == 20
    assert searched.history.shape[0] > 20 and searched.loss <= whole.loss


@settings(deadline=None, max_examples=30, derandomize=True)
@given(rows=st.integers(1, 12), width=st.integers(1, 9), copies=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_copies_built_from_moves_equal_the_edited_dense_states(rows, width, copies, seed):
    """The swap search's copies from the state's ones plus the moved entries are the CSR of the
    dense edited states: empty states, moves that switch off a zero or on a one, one entry
    switched on twice, an entry switched off and on in one selection."""
    from fastmetamer.metamers.moves import _ones_of_copies
    from fastmetamer.ops.update.reference import mask_to_csr

    gen = torch.Generator().manual_seed(seed)
    state = torch.rand(rows, width, generator=gen) < 0.3
    size = rows * width
    off = torch.randint(0, size, (6,), generator=gen)
    on = torch.randint(0, size, (6,), generator=gen)
    on[-1] = off[0]
    selections = [torch.rand(6, generator=gen) < 0.5 for _ in range(copies)]
    base = state.reshape(-1).nonzero().flatten()
    got = _ones_of_copies(base, state.shape, off, on, selections)
    want = mask_to_csr(torch.cat([apply_moves(state, off, on, chosen) for chosen in selections]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _segment_top_by_rounds(values, segment, num_segments, count):
    """The contract spelt out: ``count`` rounds, each taking every segment's largest remaining
    finite value (ties: the first position)."""
    m = values.numel()
    remaining = values.clone()
    top = torch.full((num_segments, count), m, dtype=torch.long)
    for i in range(count):
        for s in range(num_segments):
            mine = ((segment == s) & (remaining > -math.inf)).nonzero().flatten()
            if mine.numel():
                best = mine[remaining[mine].argmax()]  # argmax: the first of equal maxima
                top[s, i] = best
                remaining[best] = -math.inf
    return top, torch.cat([values, values.new_full((1,), -math.inf)])[top]


@settings(deadline=None, max_examples=60, derandomize=True)
@given(m=st.integers(0, 40), segments=st.integers(1, 6), count=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_segment_top_equals_rounds_of_maxima(m, segments, count, seed):
    """Ties, -inf entries, +inf entries, empty segments and segments with fewer values than asked."""
    from fastmetamer.metamers.refine import _segment_top

    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-3, 4, (m,), generator=gen).float()
    values[torch.rand(m, generator=gen) < 0.2] = -math.inf
    values[torch.rand(m, generator=gen) < 0.05] = math.inf
    segment = torch.randint(0, segments, (m,), generator=gen)
    got, want = _segment_top(values, segment, segments, count), _segment_top_by_rounds(values, segment, segments, count)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _scan_moves(entries, blocks, generator):
    """The kick's moves by a scan of the block's zeros per move (the oracle of _random_moves)."""
    ones = entries.nonzero().flatten()
    count = max(1, math.ceil(refine_module.KICK_FRACTION * ones.numel()))
    for e in ones[torch.randperm(ones.numel(), generator=generator)[:count]].tolist():
        zeros = (~entries & (blocks == blocks[e])).nonzero().flatten()
        if zeros.numel():
            entries[e] = False
            entries[zeros[int(torch.randint(zeros.numel(), (1,), generator=generator))]] = True


@settings(deadline=None, max_examples=60, derandomize=True)
@given(n=st.integers(1, 300), num_blocks=st.integers(1, 5), density=st.floats(0.0, 1.0), sort=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_kick_moves_equal_the_scan_of_zeros(n, num_blocks, density, sort, seed):
    """The kick's random moves (each chosen one off, the k-th current zero of its block on) equal
    the per-move scan they replace, draw for draw: full blocks, empty blocks, interleaved blocks;
    every block keeps its number of ones."""
    gen = torch.Generator().manual_seed(seed)
    entries = torch.rand(n, generator=gen) < density
    blocks = torch.randint(0, num_blocks, (n,), generator=gen)
    if sort:
        blocks = blocks.sort().values
    want, got = entries.clone(), entries.clone()
    _scan_moves(want, blocks, torch.Generator().manual_seed(seed))
    refine_module._random_moves(got, blocks, torch.Generator().manual_seed(seed))
    assert torch.equal(got, want)
    for b in range(num_blocks):
        assert int(got[blocks == b].sum()) == int(entries[blocks == b].sum())
