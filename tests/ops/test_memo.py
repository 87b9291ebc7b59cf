"""ops/memo.py: values derived from tensors are reused only for the very same, unmodified tensors."""
from __future__ import annotations

import gc

import torch

from fastmetamer.ops.memo import Memo


def _counting_memo():
    builds = []
    return Memo(size=2), builds, lambda value: (builds.append(value), value)[1]


def test_reused_for_the_same_unmodified_tensors():
    memo, builds, build = _counting_memo()
    t = torch.arange(4)
    assert memo.get([t], (1,), lambda: build("a")) == "a"
    assert memo.get([t], (1,), lambda: build("b")) == "a"
    assert builds == ["a"]


def test_rebuilt_after_an_edit_for_other_tensors_and_other_extras():
    memo, builds, build = _counting_memo()
    t = torch.arange(4)
    memo.get([t], (1,), lambda: build("a"))
    t[0] = 7  # an in-place edit bumps the version counter
    assert memo.get([t], (1,), lambda: build("b")) == "b"
    assert memo.get([t.clone()], (1,), lambda: build("c")) == "c"  # equal values, another tensor
    assert memo.get([t], (2,), lambda: build("d")) == "d"
    assert builds == ["a", "b", "c", "d"]


def test_entries_of_dead_tensors_go_and_the_size_is_bounded():
    memo, _, build = _counting_memo()
    kept = [torch.zeros(1), torch.zeros(1), torch.zeros(1)]
    for i in range(3):
        memo.get([kept[i]], (), lambda: build(i))
    assert len(memo.entries) == 2  # the least recently used went
    kept.clear()
    gc.collect()
    memo.get([torch.ones(1)], (), lambda: build("new"))
    assert len(memo.entries) == 1


def test_a_failed_build_is_not_kept():
    memo, builds, build = _counting_memo()
    t = torch.arange(3)

    def failing():
        raise ValueError("bad")

    for _ in range(2):
        try:
            memo.get([t], (), failing)
        except ValueError:
            pass
    assert memo.get([t], (), lambda: build("ok")) == "ok" and builds == ["ok"]
