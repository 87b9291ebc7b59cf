"""Distances every ``MetamerResult`` reports (SPEC §4), per independent problem."""
from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.utils import subgraph

from ..analysis import activation_distances, consistency_scores, structure_distances
from ..analysis.batched import activation_distances_rows, feature_distances_segments
from ..graph.subgraph import Subgraph

SPECTRAL_MAX_NODES = 500  # larger receptive fields report nan rather than pay an eigensolve
#: Structure distances of a graph to itself: what a feature metamer (edges unchanged) reports,
#: without computing them.
UNCHANGED_STRUCTURE = {"wl": 1.0, "edge_jaccard": 1.0, "degree_w1": 0.0, "spectral": 0.0}


def _induced_edges(data: Data, nodes: Tensor) -> Tensor:
    """Edges among ``nodes`` [k] (local ids 0..k-1)."""
    edges, _ = subgraph(nodes, data.edge_index, relabel_nodes=True, num_nodes=data.num_nodes)
    return edges


def _component_metrics(metamer: Data, reference: Data, nodes: Tensor, acts: Tensor,
                       ref_acts: Tensor, kind: str, valid: bool) -> dict[str, dict[str, float]]:
    every = nodes.numel() == metamer.num_nodes  # R is the whole problem graph: no copies of its features
    x, ref = (metamer.x, reference.x) if every else (metamer.x[nodes], reference.x[nodes])
    scores = {
        "activation": activation_distances(acts, ref_acts),
        "features": {key: float(value[0]) for key, value in feature_distances_segments(
            x, ref, torch.zeros(nodes.numel(), dtype=torch.long, device=x.device), 1).items()},
        "structure": dict(UNCHANGED_STRUCTURE) if kind == "features" else
        structure_distances(_induced_edges(metamer, nodes), _induced_edges(reference, nodes),
                            nodes.numel(), max_nodes=SPECTRAL_MAX_NODES),
    }
    consistency = consistency_scores(scores["activation"]["cosine"], scores["features"]["cosine"],
                                     scores["structure"]["wl"], kind=kind, valid=valid)
    scores["consistency"] = {k: consistency[k] for k in ("s_match", "s_in", "consistency")}
    return scores


def metamer_metrics(metamer: Data, reference: Data, sub: Subgraph, acts: Tensor, ref_acts: Tensor,
                    kind: str, valid: Tensor) -> dict:
    """Activation, feature and structure distances of the metamer against the reference, over
    each problem's receptive field R. Values are floats for one problem and lists (one entry per
    target) for a batch; ``consistency`` holds the SPEC §4 scores for ``kind`` (C is NaN unless the
    problem's metamer passed and is not trivial: ``valid`` [T] per target; a whole graph counts
    when every node does). ``acts`` / ``ref_acts``: [T, d_l] activations at the targets.

    A batch is scored in vectorised passes over all problems (:mod:`~fastmetamer.analysis.batched`);
    only the structure distances of structure and joint metamers are computed problem by problem."""
    if sub.num_components == 1:
        nodes = sub.free.nonzero().flatten()
        return _component_metrics(metamer, reference, nodes, acts, ref_acts, kind, bool(valid.all()))
    rows = sub.free.nonzero().flatten()
    scores = {"activation": activation_distances_rows(acts, ref_acts),
              "features": feature_distances_segments(metamer.x[rows], reference.x[rows], sub.component[rows],
                                                     sub.num_components)}
    if kind == "features":
        scores["structure"] = {k: [v] * sub.num_components for k, v in UNCHANGED_STRUCTURE.items()}
    else:
        per_problem = [structure_distances(_induced_edges(metamer, nodes), _induced_edges(reference, nodes),
                                           nodes.numel(), max_nodes=SPECTRAL_MAX_NODES)
                       for nodes in (rows[sub.component[rows] == c] for c in range(sub.num_components))]
        scores["structure"] = {k: [p[k] for p in per_problem] for k in per_problem[0]}
    consistency = consistency_scores(scores["activation"]["cosine"], scores["features"]["cosine"],
                                     torch.tensor(scores["structure"]["wl"], dtype=torch.float64),
                                     kind=kind, valid=valid)
    scores["consistency"] = {k: consistency[k] for k in ("s_match", "s_in", "consistency")}
    return {group: {key: (value.tolist() if isinstance(value, Tensor) else value) for key, value in values.items()}
            for group, values in scores.items()}
