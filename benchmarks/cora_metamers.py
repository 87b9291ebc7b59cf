"""Feature metamers of trained PyG models on Cora with default settings (issue acceptance run).

Trains PyG's GCN (2 layers), GraphSAGE (3 layers, ELU) and GIN (2 layers), hidden 64, then makes
feature metamers of the first ``--nodes`` test nodes at the output layer, one call per node, and
reports per model: test accuracy, median / max loss, pass rate, median seconds per metamer and the
largest mean feature cosine to the reference.

    python benchmarks/cora_metamers.py [--nodes 10] [--backend auto]

writes ``results/cora_metamers.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch_geometric.nn import models

import fastmetamer as fm
from run_benchmarks import SHARED, machine

SPECS = {"GCN": dict(num_layers=2), "GraphSAGE": dict(num_layers=3, act="elu"), "GIN": dict(num_layers=2)}


def train(name: str, data) -> torch.nn.Module:
    """Full-batch Adam (lr 0.01, weight decay 5e-4, 200 epochs), seeded."""
    torch.manual_seed(0)
    model = getattr(models, name)(data.num_features, 64, out_channels=7, **SPECS[name])
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    for _ in range(200):
        model.train()
        opt.zero_grad()
        out = model(data.x, data.edge_index)
        torch.nn.functional.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
    return model.eval()


def evaluate(name: str, data, nodes: list[int], backend: str) -> dict:
    model = train(name, data)
    acc = float((model(data.x, data.edge_index).argmax(1) == data.y)[data.test_mask].float().mean())
    rows = []
    for node in nodes:
        start = time.perf_counter()
        res = fm.generate(model, data, node, backend=backend, progress=False)
        rows.append((res.loss, res.passed, time.perf_counter() - start, res.metrics["features"]["cosine"],
                     set(res.graph.x[res.graph.free_mask].unique().tolist()) <= {0.0, 1.0}
                     and bool(res.graph.x[res.graph.free_mask].sum() == res.reference.x[res.graph.free_mask].sum()),
                     res.settings["backend"]))
    losses, passed, seconds, cosines, exact, engines = zip(*rows)
    return {"model": name, "test_acc": acc, "nodes": len(nodes), "median_loss": statistics.median(losses),
            "max_loss": max(losses), "pass_rate": sum(passed) / len(passed),
            "median_seconds": statistics.median(seconds), "max_feature_cosine": max(cosines),
            "exactly_binary_at_density": all(exact), "backend": engines[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    data = fm.datasets.load("Cora", root=os.environ.get("FASTMETAMER_DATA", SHARED))
    nodes = data.test_mask.nonzero().flatten()[: args.nodes].tolist()
    rows = []
    for name in SPECS:
        rows.append(evaluate(name, data, nodes, args.backend))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    (args.out / "cora_metamers.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    lines = ["# Feature metamers on Cora (default settings, output layer)", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "| model | backend | test acc | nodes | median loss | max loss | pass rate | median s/metamer "
             "| max feature cosine | exactly binary at density |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['backend']} | {r['test_acc']:.3f} | {r['nodes']} | {r['median_loss']:.2e} | "
              f"{r['max_loss']:.2e} | {r['pass_rate']:.2f} | {r['median_seconds']:.1f} | "
              f"{r['max_feature_cosine']:.3f} | {r['exactly_binary_at_density']} |" for r in rows]
    (args.out / "cora_metamers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
