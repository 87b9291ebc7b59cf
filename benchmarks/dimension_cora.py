"""All-nodes local metamer dimension on Cora (issue acceptance: 2-layer GCN, hidden 16, < 1 min on 2 cores).

Trains a zoo GCN (2 layers, hidden 16, seeded), then times ``fm.metamer_dimension(model, cora, None)``
(every node, w.r.t. its receptive field's features, batched float64 Gram matrices of the output layer).

    python benchmarks/dimension_cora.py

writes ``results/dimension_cora.json`` and ``.md``.
"""
from __future__ import annotations

import json
import os
import time

import torch

import fastmetamer as fm
from run_benchmarks import HERE, SHARED, machine


def main() -> None:
    cora = fm.datasets.load("Cora", root=os.environ.get("FASTMETAMER_DATA", SHARED))
    torch.manual_seed(0)
    model = fm.models.GCN(cora.num_features, 7, hidden=16, depth=2)
    accuracy = fm.models.train(model, cora, epochs=200).test_acc
    start = time.perf_counter()
    dim = fm.metamer_dimension(model, cora, None)
    seconds = time.perf_counter() - start
    row = {"nodes": int(dim.dimension.numel()), "seconds": seconds, "test_acc": accuracy,
           "median_dimension_ratio": float((dim.dimension / dim.input_dim).median()),
           "nodes_with_rank_deficit": int((dim.rank_deficit > 0).sum())}
    info = machine()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "dimension_cora.json").write_text(json.dumps({"machine": info, "result": row}, indent=2))
    (out / "dimension_cora.md").write_text(
        "# All-nodes metamer dimension, Cora, GCN (2 layers, hidden 16)\n\n"
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n\n"
        "| nodes | seconds | test acc | median D/(|R|d) | nodes with rank deficit |\n|---|---|---|---|---|\n"
        f"| {row['nodes']} | {seconds:.1f} | {accuracy:.3f} | {row['median_dimension_ratio']:.4f} | "
        f"{row['nodes_with_rank_deficit']} |\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
