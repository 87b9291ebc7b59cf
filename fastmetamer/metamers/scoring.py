"""Distances every ``MetamerResult`` reports (SPEC §4), per independent problem."""
from __future__ import annotations

from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.utils import subgraph

from ..analysis import activation_distances, consistency_scores, feature_distances, structure_distances
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
    scores = {
        "activation": activation_distances(acts, ref_acts),
        "features": feature_distances(metamer.x[nodes], reference.x[nodes]),
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
    when every node does). ``acts`` / ``ref_acts``: [T, d_l] activations at the targets."""
    per_problem = []
    for c in range(sub.num_components):
        nodes = ((sub.component == c) & sub.free).nonzero().flatten()
        rows = slice(None) if sub.num_components == 1 else slice(c, c + 1)
        ok = bool(valid.all()) if sub.num_components == 1 else bool(valid[c])
        per_problem.append(_component_metrics(metamer, reference, nodes, acts[rows], ref_acts[rows], kind, ok))
    if len(per_problem) == 1:
        return per_problem[0]
    return {group: {key: [p[group][key] for p in per_problem] for key in per_problem[0][group]}
            for group in per_problem[0]}
