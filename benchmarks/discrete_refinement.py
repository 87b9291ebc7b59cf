"""Before / after the discrete swap search: feature and structure metamers of PyG models on Cora.

Trains PyG's GCN (2 layers), GraphSAGE (3 layers, ELU) and GIN (2 layers), hidden 64 (as
``cora_metamers.py``), draws ``--nodes`` random test nodes (seed 1) and makes their feature metamers
in one call at the first and at the output layer, with default options ("after") and with the swap
search switched off (``refine_steps=0``, "before": the straight-through phase alone, best state
kept). Structure metamers of the same nodes for GCN (PyG's GraphSAGE and GIN ignore edge weights)
at the output layer. Reports per row: pass rate over non-trivial targets, trivial count, loss
quantiles, the share below 1e-3 and 1e-2, the largest mean feature cosine, the share of R's edges
kept (structure) and the wall time of the call.

    python benchmarks/discrete_refinement.py [--nodes 64] [--models GCN,GIN] [--layers first,output]
        [--modes before,after] [--append]

writes ``results/discrete_refinement.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fastmetamer as fm
from cora_metamers import train
from run_benchmarks import SHARED, machine

OUTPUT_LAYER = {"GCN": "convs.1", "GraphSAGE": "convs.2", "GIN": "convs.1"}
MODES = {"before": {"refine_steps": 0}, "after": {}}


def test_nodes(data, count: int) -> list[int]:
    """``count`` random test nodes (seed 1)."""
    test = data.test_mask.nonzero().flatten()
    order = torch.randperm(test.numel(), generator=torch.Generator().manual_seed(1))
    return sorted(test[order[:count]].tolist())


def summarise(res, seconds: float) -> dict:
    """One table row of a batched result."""
    loss, trivial = res.loss.double(), torch.as_tensor(res.trivial)
    real = ~trivial
    q = torch.quantile(loss, torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
    row = {"targets": loss.numel(), "trivial": int(trivial.sum()),
           "pass_rate": float(torch.as_tensor(res.passed)[real].float().mean()) if real.any() else float("nan"),
           "median_loss": q[0], "p90_loss": q[1], "max_loss": q[2],
           "below_1e-3": float((loss < 1e-3).double().mean()), "below_1e-2": float((loss < 1e-2).double().mean()),
           "max_feature_cosine": max(res.metrics["features"]["cosine"]), "seconds": seconds}
    if res.kind == "structure":
        jaccard = torch.tensor(res.metrics["structure"]["edge_jaccard"], dtype=torch.float64)[real]
        kept = 2 * jaccard / (1 + jaccard)  # |E' ∩ E| / |E| for equal edge counts
        row["max_edges_kept"] = float(kept.max()) if kept.numel() else float("nan")
        row["median_edges_kept"] = float(kept.median()) if kept.numel() else float("nan")
    return row


def run(name: str, data, nodes: list[int], layers: list[str], modes: list[str]) -> list[dict]:
    model = train(name, data)
    cases = [("features", {"first": "convs.0", "output": OUTPUT_LAYER[name]}[which]) for which in layers]
    if name == "GCN" and "output" in layers:
        cases.append(("structure", OUTPUT_LAYER[name]))
    rows = []
    for kind, layer in cases:
        for mode in modes:
            options = MODES[mode]
            start = time.perf_counter()
            res = fm.generate(model, data, nodes, kind=kind, layer=layer, progress=False, **options)
            row = {"model": name, "kind": kind, "layer": layer, "mode": mode,
                   **summarise(res, time.perf_counter() - start)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict], nodes: int) -> str:
    columns = ["model", "kind", "layer", "mode", "pass_rate", "trivial", "median_loss", "p90_loss", "max_loss",
               "below_1e-3", "below_1e-2", "max_feature_cosine", "max_edges_kept", "seconds"]
    lines = [f"# Discrete refinement: before / after ({nodes} random Cora test nodes, one call each)", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()), "",
             "before = straight-through phase only (`refine_steps=0`, best state kept); after = defaults "
             "(straight-through phase, then the budget-keeping swap search). pass rate over non-trivial "
             "targets; max_edges_kept = largest share of R's reference edges kept by a structure metamer.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            cells.append(f"{value:.2e}" if isinstance(value, float) and "loss" in c else
                         f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--models", default="GCN,GraphSAGE,GIN")
    parser.add_argument("--layers", default="first,output", help="first and/or output")
    parser.add_argument("--modes", default="before,after", help="before and/or after")
    parser.add_argument("--append", action="store_true", help="add the rows to the existing results")
    args = parser.parse_args()
    data = fm.datasets.load("Cora", root=SHARED)
    nodes = test_nodes(data, args.nodes)
    layers = args.layers.split(",")
    modes = args.modes.split(",")
    rows = [row for name in args.models.split(",") for row in run(name, data, nodes, layers, modes)]
    out = Path(__file__).parent / "results" / "discrete_refinement.json"
    if args.append and out.exists():
        rows = json.loads(out.read_text())["rows"] + rows
    out.write_text(json.dumps({"machine": machine(), "nodes": nodes, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, len(nodes)))


if __name__ == "__main__":
    main()
