"""Graph-level metamers: one ``generate`` call per graph against one batched call.

32 MUTAG graphs, a zoo GIN with a sum-pooled readout (2 layers, hidden 64, seeded random weights:
the work per step does not depend on training), feature metamers of the readout, ``STEPS`` steps
each, no early stop. The loop is what the study did before graph cells were batched. Each
measurement runs in a fresh subprocess; memory is the peak resident set during the measurement
minus the resident set before it (see ``run_benchmarks.py``).

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


def run_one(impl: str, steps: int) -> dict:
    """One measurement in this process: wall time, peak RSS increase and median final loss."""
    import fastmetamer as fm
    from torch_geometric.data import Batch, Data

    dataset = fm.datasets.load("MUTAG", root=os.environ.get("FASTMETAMER_DATA", SHARED))
    graphs = [Data(x=g.x, edge_index=g.edge_index) for g in dataset]
    torch.manual_seed(0)
    model = fm.models.GIN(graphs[0].num_features, 2, hidden=64, pool="add").eval()
    options = dict(layer="readout", steps=steps, tol=0.0, progress=False, scores=False,
                   null_graphs=graphs[GRAPHS:])
    base_rss = _reset_peak_rss()
    start = time.perf_counter()
    if impl == "loop":
        losses = torch.tensor([float(fm.generate(model, g, None, **options).loss) for g in graphs[:GRAPHS]])
    else:
        losses = fm.generate(model, Batch.from_data_list(graphs[:GRAPHS]), None, **options).loss
    return {"impl": impl, "graphs": GRAPHS, "steps": steps, "seconds_total": time.perf_counter() - start,
            "peak_rss_increase_mb": _status_mb("VmHWM") - base_rss, "median_final_loss": float(losses.median())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=("loop", "batched"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.steps)))
        return
    rows = []
    for impl in ("loop", "batched"):
        out = subprocess.run([sys.executable, __file__, "--one", impl, "--steps", str(args.steps)], check=True,
                             capture_output=True, text=True, cwd=HERE)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows[1]["speedup"] = rows[0]["seconds_total"] / rows[1]["seconds_total"]
    info = machine()
    lines = ["# Graph-level metamers: loop of single calls against one batched call", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             f"MUTAG, zoo GIN (sum readout), {GRAPHS} graphs x {args.steps} steps, same run.", "",
             "| impl | total s | peak RSS +MB | speed-up | median final loss |", "|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['seconds_total']:.2f} | {r['peak_rss_increase_mb']:.0f} | "
              f"{r.get('speedup', 1.0):.2f}x | {r['median_final_loss']:.2e} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "graph_batch.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    (args.out / "graph_batch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
