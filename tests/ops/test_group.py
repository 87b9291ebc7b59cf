"""The ``group`` op family (entries grouped by key: the CSR of an edge list) against its reference,
a stable argsort: identical output on awkward key lists, for any thread count, and clear errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmetamer.ops import dispatch
from fastmetamer.ops.group import reference

if not dispatch.is_available("cpu"):
    pytest.skip("cpu backend (fastmetamer._C) not built", allow_module_level=True)

from fastmetamer.ops.group import cpu  # noqa: E402


def _stable_argsort(keys: torch.Tensor, num_groups: int):
    """The contract spelt out: offsets from the counts, order from a stable sort."""
    counts = torch.bincount(keys, minlength=num_groups)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]), torch.sort(keys, stable=True).indices


def _keys(num_groups: int, size: int, hub: bool, gen: torch.Generator) -> torch.Tensor:
    """``size`` random keys in [0, num_groups) (none without groups), 70% of them the last group
    (a hub) when ``hub``."""
    size = size if num_groups else 0
    keys = torch.randint(0, max(num_groups, 1), (size,), generator=gen)
    if hub and size:
        keys[torch.rand(size, generator=gen) < 0.7] = num_groups - 1
    return keys


@settings(deadline=None, max_examples=40, derandomize=True)
@given(num_groups=st.integers(0, 40), size=st.integers(0, 300), hub=st.booleans(), seed=st.integers(0, 2**16))
def test_group_by_is_a_stable_argsort(num_groups, size, hub, seed):
    """Empty key lists, empty groups, one group holding most entries (a hub) and no groups."""
    keys = _keys(num_groups, size, hub, torch.Generator().manual_seed(seed))
    want = _stable_argsort(keys, num_groups)
    for module in (cpu, reference):
        got = module.group_by(keys, num_groups)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_group_by_parallel_path_does_not_depend_on_threads(threads):
    """Above 2^18 entries the counting sort splits the entries between threads."""
    keys = torch.randint(0, 5000, (300_000,), generator=torch.Generator().manual_seed(threads))
    keys[::7] = 17  # a hub
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu.group_by(keys, 5000)
    finally:
        torch.set_num_threads(before)
    want = _stable_argsort(keys, 5000)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("module", [cpu, reference])
def test_group_by_rejects_bad_keys(module):
    with pytest.raises(ValueError, match="lie in"):
        module.group_by(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="lie in"):
        module.group_by(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match="int64"):
        module.group_by(torch.tensor([0.0]), 3)
    with pytest.raises(ValueError, match="num_groups"):
        module.group_by(torch.tensor([0]), -1)


def _appended_by_sort(rowptr: torch.Tensor, source: torch.Tensor, edge_id: torch.Tensor, node_col: torch.Tensor):
    """The contract of append_node_entries spelt out: the coordinates (edges, then one entry per
    node) stably sorted by row."""
    n, num_edges = rowptr.numel() - 1, source.numel()
    row = torch.cat([torch.repeat_interleave(torch.arange(n), rowptr.diff()), torch.arange(n)])
    order = torch.sort(row, stable=True).indices
    coordinate = torch.cat([edge_id, torch.arange(n) + num_edges])
    return rowptr + torch.arange(n + 1), torch.cat([source, node_col])[order], coordinate[order]


@settings(deadline=None, max_examples=40, derandomize=True)
@given(n=st.integers(0, 40), size=st.integers(0, 300), hub=st.booleans(), seed=st.integers(0, 2**16))
def test_append_node_entries_equals_the_sorted_coordinates(n, size, hub, seed):
    """Isolated nodes, a hub, no edges and no nodes."""
    gen = torch.Generator().manual_seed(seed)
    dst = _keys(n, size, hub, gen)
    rowptr, edge_id = _stable_argsort(dst, n)
    source = torch.randint(0, max(n, 1), (dst.numel(),), generator=gen)[edge_id]
    node_col = torch.randint(0, 2 * max(n, 1), (n,), generator=gen)
    want = _appended_by_sort(rowptr, source, edge_id, node_col)
    for module in (cpu, reference):
        got = module.append_node_entries(rowptr, source, edge_id, node_col)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_append_node_entries_parallel_path_does_not_depend_on_threads(threads):
    """Above 2^18 entries the rows are written in parallel."""
    gen = torch.Generator().manual_seed(threads)
    dst = torch.randint(0, 5000, (300_000,), generator=gen)
    dst[::7] = 17  # a hub
    rowptr, edge_id = _stable_argsort(dst, 5000)
    source, node_col = torch.randint(0, 5000, (300_000,), generator=gen), torch.arange(5000)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu.append_node_entries(rowptr, source, edge_id, node_col)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(got, _appended_by_sort(rowptr, source, edge_id, node_col)))


@pytest.mark.parametrize("module", [cpu, reference])
def test_append_node_entries_rejects_bad_csr(module):
    rowptr, ids = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="rise from 0"):
        module.append_node_entries(torch.tensor([0, 2, 1]), ids, ids, ids)
    with pytest.raises(ValueError, match="rise from 0"):
        module.append_node_entries(torch.tensor([0, 1, 3]), ids, ids, ids)
    with pytest.raises(ValueError, match="node_col"):
        module.append_node_entries(rowptr, ids, ids, torch.tensor([0]))
    with pytest.raises(ValueError, match="int64"):
        module.append_node_entries(rowptr, ids.float(), ids, ids)
