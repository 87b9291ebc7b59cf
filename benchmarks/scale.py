"""Scale: fastmetamer against the plain PyG way on large random graphs, end to end (SPEC §9).

For each graph size n (random graph, average in-degree 20, F = 100 binary features with 5% ones)
and each PyG model (``GCN``, ``GraphSAGE``, ``GIN``; 2 layers, hidden 64, output 16, untrained:
the cost does not depend on the weights), three jobs, each run in its own process so that its
peak memory is its own:

- ``one``: one node's feature metamer, 50 steps;
- ``many``: 200 node metamers in one call (PyG: a loop over the nodes), 50 steps;
- ``one_again``: one node's metamer after an earlier call on another node of the same graph with
  the same model (fastmetamer reuses its cached whole-graph pass; only the second call is timed);
- ``many1000``: the same with 1,000 nodes;
- ``whole``: a whole-graph metamer, 10 steps.

The PyG side is ``pyg_baseline.py`` (``k_hop_subgraph`` + straight-through Adam loop, the same
work without the pass criterion and scores). fastmetamer is called as a user calls it, with
default options; its time is split into the optimisation loop (``res.seconds``) and the rest
(setup, criterion, scoring). Memory is the process's peak RSS above what it held once the graph
was built. A job that runs out of time or memory is reported as such.

    python benchmarks/scale.py [--graphs 200000 1000000 products cora] [--models GCN] [--jobs one many whole whole30]

writes ``results/scale.json`` and ``results/scale.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STEPS = {"one": 50, "one_again": 50, "many": 50, "many1000": 50, "whole": 10, "whole30": 30}
TARGETS = {"one": 1, "one_again": 1, "many": 200, "many1000": 1000}  # node targets (whole: every node)


def load_graph(size: str):
    """``"cora"`` (Cora from ``../shared/data`` or ``FASTMETAMER_DATA``), ``"products"`` (a random
    graph of ogbn-products' size: 2,449,029 nodes, ~123.9 M directed edges) or a node count as
    text: a random graph of that size, average in-degree 20."""
    if size == "products":
        return random_graph(2_449_029, degree=50.6)
    if size == "cora":
        import fastmetamer as fm

        return fm.datasets.load("Cora", root=os.environ.get("FASTMETAMER_DATA", str(HERE.parent.parent / "shared" / "data")))
    return random_graph(int(size))


def random_graph(n: int, seed: int = 0, degree: float = 20.0):
    """A random directed graph with n nodes and ``degree`` n edges, binary features [n, 100] (5% ones)."""
    from torch_geometric.data import Data

    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 100, generator=gen) < 0.05).float()
    return Data(x=x, edge_index=torch.randint(0, n, (2, int(degree * n)), generator=gen))


def pyg_model(name: str, in_channels: int = 100):
    from torch_geometric.nn import models

    torch.manual_seed(0)
    return getattr(models, name)(in_channels, 64, num_layers=2, out_channels=16).eval()


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_one(size: str, model_name: str, job: str, side: str) -> dict:
    """One measurement in this process."""
    import fastmetamer as fm  # imports are not part of the measured call
    from pyg_baseline import feature_metamer, node_metamers

    graph = load_graph(size)
    n = graph.num_nodes
    model = pyg_model(model_name, graph.num_features)
    count = TARGETS.get(job, 0)
    nodes = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:count].tolist()
    base = peak_gb()
    started = time.perf_counter()
    row = {"graph": size, "n": n, "edges": graph.num_edges, "model": model_name, "job": job, "side": side,
           "steps": STEPS[job], "threads": torch.get_num_threads()}
    if side == "pyg":
        if job.startswith("whole"):
            feature_metamer(model, graph.x, graph.edge_index, None, STEPS[job])
        else:
            sample = min(count, int(os.environ.get("PYG_SAMPLE", count)))
            node_metamers(model, graph.x, graph.edge_index, nodes[:sample], 2, STEPS[job])
            if sample < count:  # the loop's nodes cost alike: scale the loop's time
                row["extrapolated_from"] = sample
    else:
        if job == "one_again":  # an earlier call on another node: not timed
            fm.generate(model, graph, (nodes[0] + 1) % n, steps=STEPS[job], progress=False)
            started = time.perf_counter()
        target = None if job.startswith("whole") else nodes[0] if job.startswith("one") else nodes
        res = fm.generate(model, graph, target, steps=STEPS[job], progress=False)
        row.update(loop_s=res.seconds, passed=float(torch.as_tensor(res.passed).float().mean()))
    scale = count / row["extrapolated_from"] if "extrapolated_from" in row else 1.0
    row.update(seconds=(time.perf_counter() - started) * scale,
               peak_gb_above_graph=peak_gb() - base, graph_gb=base)
    if "loop_s" in row:
        row["other_s"] = row["seconds"] - row["loop_s"]
    return row


def measure(size: str, model_name: str, job: str, side: str, timeout: float, pyg_sample: int = 200) -> dict:
    """``run_one`` in a fresh process (its own peak memory); a timeout or crash is a result too."""
    about = {"graph": size, "model": model_name, "job": job, "side": side}
    try:
        out = subprocess.run([sys.executable, __file__, "--one", size, model_name, job, side], cwd=HERE,
                             capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PYG_SAMPLE": str(pyg_sample)})
    except subprocess.TimeoutExpired:
        return {**about, "status": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        reason = "killed (out of memory?)" if out.returncode < 0 else out.stderr.strip().splitlines()[-1][:200]
        return {**about, "status": reason}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "status": "ok"}


def markdown(rows: list[dict], info: dict) -> str:
    lines = ["# Scale: fastmetamer against the plain PyG loop", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "Random graphs, average in-degree 20 (products: 50.6), F = 100 binary (5% ones); PyG models, 2 layers, hidden 64. "
             "one = one node, 50 steps (one_again: timed after an untimed call on another node, which leaves fastmetamer's "
             "whole-graph pass cached); many = 200 nodes in one call (PyG: a loop), 50 steps; many1000: 1,000 nodes; "
             "whole = whole graph, 10 steps (whole30: 30 steps). PyG many-node times marked (from k nodes) ran the loop over k "
             "of the nodes and scale its time by (nodes) / k. fastmetamer: default options, end to end; loop = its optimisation loop, other = "
             "setup + criterion + scoring. Memory: peak RSS above the loaded graph.", "",
             "| graph (nodes) | model | job | PyG s | fastmetamer s (loop / other) | speed-up | PyG GB | fastmetamer GB | passed |",
             "|---|---|---|---|---|---|---|---|---|"]
    pairs: dict = {}
    for row in rows:
        pairs.setdefault((row["graph"], row["model"], row["job"]), {})[row["side"]] = row
    for (graph, model, job), sides in pairs.items():
        pyg, fast = sides.get("pyg", {}), sides.get("fastmetamer", {})

        def cell(row, key, fmt):
            return fmt.format(row[key]) if row.get("status") == "ok" else row.get("status", "not run")

        ratio = f"{pyg['seconds'] / fast['seconds']:.1f}×" if pyg.get("status") == fast.get("status") == "ok" else "-"
        timing = (f"{fast['seconds']:.1f} ({fast['loop_s']:.1f} / {fast['other_s']:.1f})"
                  if fast.get("status") == "ok" else fast.get("status", "-"))
        name = {"products": "2,449,029 (products size)"}.get(graph, graph if not graph.isdigit() else f"{int(graph):,}")
        pyg_s = cell(pyg, "seconds", "{:.1f}") + (f" (from {pyg['extrapolated_from']} nodes)"
                                                  if "extrapolated_from" in pyg else "")
        lines.append(f"| {name} | {model} | {job} | {pyg_s} | {timing} | {ratio} | "
                     f"{cell(pyg, 'peak_gb_above_graph', '{:.2f}')} | {cell(fast, 'peak_gb_above_graph', '{:.2f}')} | "
                     f"{cell(fast, 'passed', '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", nargs="+", default=["200000", "1000000"],
                        help="node counts of random graphs, 'products' (ogbn-products' size) or 'cora'")
    parser.add_argument("--models", nargs="+", default=["GCN"])
    parser.add_argument("--jobs", nargs="+", default=["one", "many", "whole"], choices=list(STEPS))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--out", default=str(HERE / "results" / "scale"), help="output path without suffix")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in the output JSON (a re-measured row replaces its old one)")
    parser.add_argument("--pyg-sample", type=int, default=1000,
                        help="PyG's loop for 'many' / 'many1000' runs this many nodes; its time is scaled up")
    parser.add_argument("--sides", nargs="+", default=["pyg", "fastmetamer"], choices=["pyg", "fastmetamer"])
    args = parser.parse_args()
    from run_benchmarks import machine

    out = Path(args.out)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if args.append else []
    for size in args.graphs:
        for model_name in args.models:
            for job in args.jobs:
                for side in args.sides:
                    rows.append(measure(size, model_name, job, side, args.timeout, args.pyg_sample))
                    print(json.dumps(rows[-1]), flush=True)
    latest = {(r["graph"], r["model"], r["job"], r["side"]): r for r in rows}  # a re-run replaces its row
    rows = list(latest.values())
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, machine()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        size, model_name, job, side = sys.argv[2:6]
        print(json.dumps(run_one(size, model_name, job, side)))
    else:
        main()
