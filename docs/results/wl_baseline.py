"""A size-matched random baseline for the WL similarity of the study's structure metamers.

WL similarity (degree labels, 3 refinements, normalised subtree kernel) is higher on larger
graphs even when the edges are rewired at random: the label histograms of a large receptive field
change proportionally less when its edges move. The structure cells' WL similarities therefore
cannot be compared across receptive-field sizes (APPNP's 10-hop fields against the others' 2-hop
fields) without a baseline of the same size.

For every non-trivial target of every structure cell of ``study/`` (Cora and CiteSeer), this
script takes the edges among the target's receptive field R (the free nodes of the library's
:func:`~fastmetamer.graph.subgraph.receptive_field`, ``hops`` hops: 10 for APPNP's propagation
layer, 2 for the other architectures' output layers), moves as many of them as the metamer moved
(with the edge count kept, edge Jaccard J keeps round(E 2J / (1 + J)) of the E edges) to distinct
uniformly random node pairs of R that are not edges, and computes the WL similarity of that
random rewiring to the reference, averaged over ``DRAWS`` draws. It writes ``wl_baseline.md``
beside itself: per cell, the mean WL similarity of the metamers and of their random rewirings.

Usage: ``.venv/bin/python docs/results/wl_baseline.py [DATA_ROOT]`` (DATA_ROOT: the datasets'
folder, default ``../shared/data``).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from torch_geometric.utils import subgraph, to_undirected

import fastmetamer as fm
from fastmetamer.analysis import wl_similarity
from fastmetamer.graph.subgraph import receptive_field

HERE = Path(__file__).resolve().parent
DATA_ROOT = sys.argv[1] if len(sys.argv) > 1 else "../shared/data"
#: Receptive-field radius of each architecture's output layer in the study (depth 2; SGC K = 2,
#: APPNP K = 10).
HOPS = {"gcn": 2, "graphsage": 2, "gin": 2, "gat": 2, "sgc": 2, "appnp": 10}
DRAWS = 5


def random_rewiring(edges: torch.Tensor, nodes: int, kept: int, generator: torch.Generator) -> torch.Tensor:
    """``edges`` [2, E] (undirected, each pair once, u < v) with ``kept`` of them, chosen at random,
    kept and the others replaced by distinct uniformly random pairs of distinct nodes among
    ``nodes`` that are not among the kept edges (as many as exist); returned in both directions."""
    order = torch.randperm(edges.shape[1], generator=generator)
    keep = edges[:, order[:kept]]
    wanted = edges.shape[1] - kept
    pairs = torch.combinations(torch.arange(nodes)).t()  # every pair u < v of R
    taken = torch.isin(pairs[0] * nodes + pairs[1], keep[0] * nodes + keep[1])
    free = pairs[:, ~taken]
    new = free[:, torch.randperm(free.shape[1], generator=generator)[:wanted]]
    return to_undirected(torch.cat([keep, new], dim=1), num_nodes=nodes)


def baseline_wl(graph, target: int, hops: int, jaccard: float, seed: int) -> float:
    """Mean WL similarity to the reference of ``DRAWS`` random rewirings of the edges among
    ``target``'s receptive field that move as many of them as a metamer with edge Jaccard
    ``jaccard``."""
    sub = receptive_field(graph.x, graph.edge_index, None, torch.tensor([target]), hops)
    nodes = sub.free.nonzero().flatten()
    local, _ = subgraph(nodes, sub.edge_index, relabel_nodes=True, num_nodes=sub.x.shape[0])
    undirected = local[:, local[0] < local[1]]
    kept = round(undirected.shape[1] * 2.0 * jaccard / (1.0 + jaccard))
    generator = torch.Generator().manual_seed(seed)
    return statistics.fmean(
        wl_similarity(random_rewiring(undirected, nodes.numel(), kept, generator), local, nodes.numel())
        for _ in range(DRAWS))


def cell_rows(dataset: str, graph) -> list[str]:
    """One table row per structure cell of ``dataset`` (seeds pooled)."""
    rows = []
    for arch, hops in HOPS.items():
        metamer, random = [], []
        for path in sorted((HERE / "study" / "cells").glob(f"{dataset}-{arch}-none-d2-w64-s*-structure.json")):
            record = json.loads(path.read_text())
            per_target = record["per_target"]
            for i, target in enumerate(record["targets"]):
                if per_target["trivial"][i]:
                    continue
                metamer.append(per_target["wl_similarity"][i])
                random.append(baseline_wl(graph, target, hops, per_target["edge_jaccard"][i], seed=target))
        if metamer:
            rows.append(f"| {dataset} | {arch} | {hops} | {len(metamer)} | {statistics.fmean(metamer):.2f} | "
                        f"{statistics.fmean(random):.2f} |")
    return rows


def main() -> Path:
    lines = ["# WL similarity of structure metamers against a size-matched random rewiring", "",
             "Written by `docs/results/wl_baseline.py` from the structure cells of `study/` (non-trivial",
             f"targets, seeds pooled; random rewiring: as many edges moved as the metamer moved, to non-edges, {DRAWS} draws each).", "",
             "| dataset | arch | hops | targets | WL, metamers | WL, random rewiring |", "|---|---|---|---|---|---|"]
    for dataset in ("Cora", "CiteSeer"):
        lines += cell_rows(dataset, fm.datasets.load(dataset, root=DATA_ROOT))
    out = HERE / "wl_baseline.md"
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    print(main())
