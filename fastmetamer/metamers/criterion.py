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
                   rtol: float = 1e-6, chunk: int = 1024) -> NullDistances:
    """Null-distribution thresholds for targets ``target_ids`` [T] with activations [T, d],
    against real nodes ``null_ids`` [N] with activations ``null_acts`` [N, d]."""
    thresholds, twins = [], []
    null_acts = null_acts.double()
    for start in range(0, target_ids.numel(), chunk):
        acts = target_acts[start:start + chunk].double()
        dist = torch.cdist(acts, null_acts)
        is_self = null_ids.unsqueeze(0) == target_ids[start:start + chunk].unsqueeze(1)
        is_twin = (dist <= rtol * acts.norm(dim=1, keepdim=True).clamp_min(1e-30)) & ~is_self
        dist = dist.masked_fill(is_self | is_twin, float("inf"))
        thresholds.append(dist.min(1).values if dist.shape[1] else dist.new_full((acts.shape[0],), float("inf")))
        twins.append(is_twin.sum(1))
    return NullDistances(torch.cat(thresholds).float(), torch.cat(twins))


def passes(metamer_acts: Tensor, target_acts: Tensor, null: NullDistances) -> tuple[Tensor, Tensor]:
    """(passed [T] bool, distance [T]): ||h'_v - h_v|| < threshold_v."""
    distance = (metamer_acts.double() - target_acts.double()).norm(dim=1).float()
    return distance < null.threshold, distance
