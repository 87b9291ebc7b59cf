"""Graph-level metamers: a loop of single calls against one batched call, and the fast engine
against the reference (autograd) engine on batched calls.

1. 32 MUTAG graphs, a zoo GIN with a sum-pooled readout, feature metamers of the readout: one
   ``generate`` call per graph (what the study did before graph cells were batched) against one
   call on the ``Batch``.
2. The batched call on the fast engine (``backend="auto"``: the lowered program, pooled readout
   included) against the reference engine (``backend="reference"``), for 32 graphs of MUTAG and of
   PROTEINS and the zoo's GIN (sum), GCN (mean), GAT (sum) and APPNP (K = 10, max readout).

Models: 2 layers, hidden 64, seeded random weights (the work per step does not depend on
training); ``STEPS`` steps, no early stop, scoring off. Each measurement runs in a fresh
subprocess; memory is the peak resident set during the measurement minus the resident set before
it (see ``run_benchmarks.py``).

    python benchmarks/graph_batch.py [--steps 200] [--out benchmarks/results]

writes ``graph_batch.json`` and ``graph_batch.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from run_benchmarks import HERE, SHARED, _reset_peak_rss, _status_mb, machine

GRAPHS = 32
#: (zoo architecture, readout, extra options) of the engine comparison
ENGINE_MODELS = {"gin": ("add", {}), "gcn": ("mean", {}), "gat": ("add", {}), "appnp": ("max", {"K": 10})}


def run_one(impl: str, steps: int, dataset_name: str = "MUTAG", arch: str = "gin") -> dict:
    """One measurement in this process (impl: "loop", "batched" (fast engine) or "reference"):
    wall time, peak RSS increase, median final loss and the engine used."""
    import fastmetamer as fm
    from torch_geometric.data import Batch, Data

    dataset = fm.datasets.load(dataset_name, root=os.environ.get("FASTMETAMER_DATA", SHARED))
    graphs = [Data(x=g.x, edge_index=g.edge_index) for g in dataset]
    torch.manual_seed(0)
    pool, extra = ENGINE_MODELS[arch]
    model = fm.models.build_model(arch, graphs[0].num_features, 2, hidden=64, pool=pool, **extra).eval()
    options = dict(layer="readout", steps=steps, tol=0.0, progress=False, scores=False,
                   null_graphs=graphs[GRAPHS:], backend="reference" if impl == "reference" else "auto")
    base_rss = _reset_peak_rss()
    start = time.perf_counter()
    if impl == "loop":
        results = [fm.generate(model, g, None, **options) for g in graphs[:GRAPHS]]
        losses, backend = torch.tensor([float(r.loss) for r in results]), results[0].settings["backend"]
    else:
        result = fm.generate(model, Batch.from_data_list(graphs[:GRAPHS]), None, **options)
        losses, backend = result.loss, result.settings["backend"]
    return {"impl": impl, "dataset": dataset_name, "model": arch, "pool": pool, "backend": backend,
            "graphs": GRAPHS, "steps": steps, "seconds_total": time.perf_counter() - start,
            "peak_rss_increase_mb": _status_mb("VmHWM") - base_rss, "median_final_loss": float(losses.median())}


def _measure(impl: str, steps: int, dataset: str, arch: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", impl, dataset, arch, "--steps", str(steps)], check=True,
                         capture_output=True, text=True, cwd=HERE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> list[str]:
    lines = ["| dataset | model (readout) | impl | backend | total s | peak RSS +MB | speed-up | median final loss |",
             "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {r['dataset']} | {r['model']} ({r['pool']}) | {r['impl']} | {r['backend']} | "
                     f"{r['seconds_total']:.2f} | {r['peak_rss_increase_mb']:.0f} | {r.get('speedup', 1.0):.2f}x | "
                     f"{r['median_final_loss']:.2e} |" for r in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "DATASET", "ARCH"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.steps, args.one[1], args.one[2])))
        return
    batching = [_measure(impl, args.steps, "MUTAG", "gin") for impl in ("loop", "batched")]
    batching[1]["speedup"] = batching[0]["seconds_total"] / batching[1]["seconds_total"]
    engines = []
    for dataset in ("MUTAG", "PROTEINS"):
        for arch in ENGINE_MODELS:
            pair = [_measure(impl, args.steps, dataset, arch) for impl in ("reference", "batched")]
            pair[1]["speedup"] = pair[0]["seconds_total"] / pair[1]["seconds_total"]
            engines += pair
            print("\n".join(_table(pair)[2:]), flush=True)
    info = machine()
    lines = ["# Graph-level metamers", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "## A loop of single calls against one batched call", "",
             f"MUTAG, zoo GIN (sum readout), {GRAPHS} graphs x {args.steps} steps, same run.", "",
             *_table(batching), "", "## Fast engine against the reference engine (batched calls)", "",
             f"{GRAPHS} graphs x {args.steps} steps per call; each pair measured back to back.", "",
             *_table(engines), "", "speed-up = the first row's total time / this row's, same run."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "graph_batch.json").write_text(json.dumps({"machine": info, "batching": batching,
                                                           "engines": engines}, indent=2))
    (args.out / "graph_batch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
