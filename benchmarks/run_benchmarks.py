"""Metamer benchmarks: fastmetamer against the plain PyG loop doing the same work, same run.

Cases (binary features, straight-through top-rho, margin term, Adam, relative loss):
  whole   -- whole-graph feature-metamer steps (node=None), time per step;
  nodes64 -- 64 independent node metamers of 100 steps: one batched fastmetamer call against a
             Python loop of the PyG version over k-hop subgraphs.
Graphs: Cora (from ../shared/data or $FASTMETAMER_DATA) and a 100k-node synthetic graph.
Models: PyG's GCN, GraphSAGE and GIN (2 layers, hidden 64, seeded random weights: the work per
step does not depend on training); with ``--models GAT SGC APPNP``, PyG's GAT (2 layers, hidden
64, one head) and fastmetamer's zoo SGC (K = 2) and APPNP (2-layer MLP, K = 10 hops, alpha 0.1),
whose PyG loop runs the same MessagePassing modules over (K + 1)-hop subgraphs. Every measurement
runs in a fresh subprocess; its memory is the peak resident set during the measurement minus the
resident set before it (Linux: the peak mark is reset after loading the data and the model).
"total s" is the whole call as a user makes it (fastmetamer: setup, receptive fields, criterion;
scoring off on both sides); "speed-up" compares total times, "step speed-up" time per step.
fastmetamer's call includes its discrete swap search after the straight-through steps (200
iterations per node target by default), which the PyG loop does not do; ``--refine-steps 0``
switches it off so that both sides do the same work (the result files say which was used).

    python benchmarks/run_benchmarks.py [--quick] [--models GAT SGC APPNP] [--graphs Cora]
        [--refine-steps N] [--name metamer_benchmarks] [--out benchmarks/results]

writes ``<name>.json`` and ``<name>.md`` (with the machine description).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODELS = ("GCN", "GraphSAGE", "GIN")
#: message-passing hops of each benchmark model (the PyG loop's subgraphs take one more)
HOPS = {"GCN": 2, "GraphSAGE": 2, "GIN": 2, "GAT": 2, "SGC": 2, "APPNP": 10}
SHARED = HERE.parents[1] / "shared" / "data"


def _graph(name: str):
    import fastmetamer as fm

    if name == "Cora":
        return fm.datasets.load("Cora", root=os.environ.get("FASTMETAMER_DATA", SHARED))
    return fm.datasets.synthetic_graph(num_nodes=100_000, num_features=500, num_classes=10, seed=0)


def _model(name: str, graph):
    import fastmetamer as fm
    from torch_geometric.nn import models

    torch.manual_seed(0)
    classes = int(graph.y.max()) + 1
    if name in ("SGC", "APPNP"):
        return fm.models.build_model(name.lower(), graph.num_features, classes, hidden=64,
                                     **({"K": 2} if name == "SGC" else {"K": 10, "alpha": 0.1})).eval()
    return getattr(models, name)(graph.num_features, 64, num_layers=2, out_channels=classes).eval()


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak_rss() -> float:
    """Reset the peak-RSS mark to the current RSS (Linux: write 5 to clear_refs); returns it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def run_one(case: str, graph_name: str, model_name: str, impl: str, steps: int, refine_steps: int | None) -> dict:
    """One measurement (in this process): wall time, time per step, peak RSS increase, loss;
    ``refine_steps``: fastmetamer's swap-search iterations (None: its default)."""
    import fastmetamer as fm

    from pyg_baseline import feature_metamer, node_metamers

    graph = _graph(graph_name)
    model = _model(model_name, graph)
    for p in model.parameters():
        p.requires_grad_(False)
    nodes = graph.test_mask.nonzero().flatten()[:64].tolist()
    base_rss = _reset_peak_rss()
    start = time.perf_counter()
    if impl == "pyg":
        if case == "whole":
            history = feature_metamer(model, graph.x, graph.edge_index, None, steps)
            final = history[-1]
        else:
            histories = node_metamers(model, graph.x, graph.edge_index, nodes, hops=HOPS[model_name], steps=steps)
            final = float(torch.tensor([h[-1] for h in histories]).median())
        total = time.perf_counter() - start
        per_step = total / (steps * (1 if case == "whole" else len(nodes)))
    else:
        res = fm.generate(model, graph, None if case == "whole" else nodes, steps=steps, tol=0.0,
                          progress=False, scores=False, refine_steps=refine_steps)
        total = time.perf_counter() - start
        per_step = res.seconds / (len(res.history) * (1 if case == "whole" else len(nodes)))
        final = float(res.history[-1].median())
        impl = f"fastmetamer[{res.settings['backend']}]"
    return {"case": case, "graph": graph_name, "model": model_name, "impl": impl, "steps": steps,
            "seconds_total": total, "seconds_per_step": per_step,
            "peak_rss_increase_mb": _status_mb("VmHWM") - base_rss, "final_loss": final}


def machine() -> dict:
    """A description of the machine the numbers come from."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", *args], check=True, capture_output=True, text=True,
                         cwd=HERE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _markdown(rows: list[dict], info: dict, refine_steps: int | None = None) -> str:
    search = ("fastmetamer's default (200 iterations per node target after the straight-through steps; the PyG "
              "loop has none)" if refine_steps is None else
              "off on both sides (`refine_steps=0`: the same work)" if refine_steps == 0 else
              f"{refine_steps} iterations on fastmetamer's side (the PyG loop has none)")
    lines = ["# Metamer benchmarks", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             f"Discrete swap search: {search}.", "",
             "| case | graph | model | impl | steps | total s | ms/step | peak RSS +MB | speed-up | step speed-up "
             "| final loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['graph']} | {row['model']} | {row['impl']} | {row['steps']} | "
                     f"{row['seconds_total']:.2f} | {1000 * row['seconds_per_step']:.2f} | "
                     f"{row['peak_rss_increase_mb']:.0f} | {row.get('speedup', 1.0):.2f}x | "
                     f"{row.get('step_speedup', 1.0):.2f}x | {row['final_loss']:.2e} |")
    lines += ["", "speed-up = PyG total time / fastmetamer total time of the call; step speed-up = PyG time per "
              "step / fastmetamer time per step (nodes64: per target and step); same run."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=5, metavar=("CASE", "GRAPH", "MODEL", "IMPL", "STEPS"))
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="fastmetamer's swap-search iterations (default: the library's; 0: off, as the PyG loop)")
    parser.add_argument("--quick", action="store_true", help="Cora only, GCN only")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(HOPS))
    parser.add_argument("--graphs", nargs="+", default=["Cora", "synthetic-100k"], choices=["Cora", "synthetic-100k"])
    parser.add_argument("--name", default="metamer_benchmarks", help="result file name (without suffix)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.one:
        case, graph, model, impl, steps = args.one
        print(json.dumps(run_one(case, graph, model, impl, int(steps), args.refine_steps)))
        return
    graphs = ("Cora",) if args.quick else args.graphs
    models = ("GCN",) if args.quick else args.models
    rows = []
    for graph in graphs:
        for model in models:
            for case, steps in (("whole", 20 if graph == "Cora" else 5), ("nodes64", 100)):
                search = [] if args.refine_steps is None else ["--refine-steps", str(args.refine_steps)]
                pair = [_subprocess([case, graph, model, impl, str(steps), *search]) for impl in ("pyg", "fast")]
                pair[1]["speedup"] = pair[0]["seconds_total"] / pair[1]["seconds_total"]
                pair[1]["step_speedup"] = pair[0]["seconds_per_step"] / pair[1]["seconds_per_step"]
                rows += pair
                print(_markdown(pair, {}).splitlines()[-3], flush=True)
    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"machine": info, "refine_steps": args.refine_steps, "rows": rows}, indent=2))
    (args.out / f"{args.name}.md").write_text(_markdown(rows, info, args.refine_steps))


if __name__ == "__main__":
    main()
