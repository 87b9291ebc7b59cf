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


@settings(deadline=None, max_examples=40, derandomize=True)
@given(num_groups=st.integers(0, 40), size=st.integers(0, 300), hub=st.booleans(), seed=st.integers(0, 2**16))
def test_group_by_is_a_stable_argsort(num_groups, size, hub, seed):
    """Empty key lists, empty groups, one group holding most entries (a hub) and no groups."""
    size = size if num_groups else 0
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, max(num_groups, 1), (size,), generator=gen)
    if hub and size:
        keys[torch.rand(size, generator=gen) < 0.7] = num_groups - 1
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
