"""The success criterion of SPEC §2.3: beat the null distribution of natural pairs.

A metamer of target v passes when its layer-l activation is closer (Euclidean) to v's reference
activation than the activation of any other real node of the graph is. Nodes whose activation
equals v's (twins: identical neighbourhoods) are left out of the null distribution and counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NullDistances:
    """Per target: the smallest distance to another real node's activation, and the twins.

    Attributes:
        threshold: [T] min_u ||H[u] - H[v]|| over real nodes u != v that are not twins
            (inf when there is none).
        twins: [T] number of other nodes whose activation equals v's (within ``rtol``).
    """

    threshold: Tensor
    twins: Tensor


def null_distances(null_acts: Tensor, null_ids: Tensor, target_ids: Tensor, target_acts: Tensor,
                   rtol: float = 1e-6, chunk_entries: int = 1 << 24) -> NullDistances:
    """Null-distribution thresholds for targets ``target_ids`` [T] with activations [T, d],
    against real nodes ``null_ids`` [N] (distinct) with activations ``null_acts`` [N, d]. A
    target id of -1 marks a target that is not in the null set (e.g. a graph-level target).

    Distances are computed in float64, ``chunk_entries`` target-null pairs at a time (memory
    O(chunk_entries), time O(T N d)); a target's own entry in the null set is left out."""
    null_acts = null_acts.double()
    position = torch.full((int(max(null_ids.max(), target_ids.max())) + 1 if null_ids.numel() else 1,), -1,
                          dtype=torch.long)
    position[null_ids] = torch.arange(null_ids.numel())
    own = torch.where(target_ids >= 0, position[target_ids.clamp_min(0)], -1) if null_ids.numel() \
        else target_ids.new_full(target_ids.shape, -1)
    rows = max(1, chunk_entries // max(1, null_ids.numel()))
    thresholds, twins = [], []
    for start in range(0, target_ids.numel(), rows):
        acts = target_acts[start:start + rows].double()
        dist = torch.cdist(acts, null_acts)
        mine = own[start:start + rows]
        has_own = (mine >= 0).nonzero().flatten()
        dist[has_own, mine[has_own]] = float("inf")
        is_twin = dist <= rtol * acts.norm(dim=1, keepdim=True).clamp_min(1e-30)
        twins.append(is_twin.sum(1))
        dist.masked_fill_(is_twin, float("inf"))
        thresholds.append(dist.min(1).values if dist.shape[1] else dist.new_full((acts.shape[0],), float("inf")))
    return NullDistances(torch.cat(thresholds).float(), torch.cat(twins))


def passes(metamer_acts: Tensor, target_acts: Tensor, null: NullDistances) -> tuple[Tensor, Tensor]:
    """(passed [T] bool, distance [T]): ||h'_v - h_v|| < threshold_v."""
    distance = (metamer_acts.double() - target_acts.double()).norm(dim=1).float()
    return distance < null.threshold, distance
