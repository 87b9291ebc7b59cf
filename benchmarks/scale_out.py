"""Scale-out: node targets shared across ranks of a gloo process group against one process (SPEC §10).

Jobs (each rank and the single process run one thread; the model is a 2-layer zoo GCN, hidden
64: on Cora trained for 50 epochs before the clock starts, identically on every rank; on the
random graph seeded random weights, as the cost does not depend on them):

- ``cora``: 16 Cora node metamers (default options) plus the metamer dimension of 64 nodes;
- ``random``: 200 node metamers of 50 steps on a random graph of 200,000 nodes (average
  in-degree 20, F = 100 binary features, 5% ones).

Each job runs once as a plain process and once under ``torchrun --nproc_per_node=2``: time of
the calls (the slowest rank), each rank's peak resident memory above what it held once the graph
and model were ready, and the share of the targets each rank solved.

    python benchmarks/scale_out.py [--jobs cora random]

writes ``results/scale_out.json`` and ``results/scale_out.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _problem(job: str):
    """(graph, trained model, node targets, dimension targets) of a job."""
    import fastmetamer as fm

    if job == "cora":
        graph = fm.datasets.load("Cora", root=os.environ.get("FASTMETAMER_DATA", str(SHARED)))
    else:
        from scale import random_graph

        graph = random_graph(200_000)
    torch.manual_seed(0)
    model = fm.models.build_model("gcn", graph.num_features, 7, hidden=64)
    if job == "cora":
        fm.models.train(model, graph, epochs=50, seed=0)
    nodes = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(1))
    count = 16 if job == "cora" else 200
    return graph, model.eval(), nodes[:count].tolist(), nodes[:64].tolist() if job == "cora" else []


def worker(job: str, out: str) -> None:
    """One process (a rank under torchrun, or alone): the job's calls, timed; writes rank<r>.json."""
    torch.set_num_threads(1)
    import fastmetamer as fm
    from fastmetamer import distributed
    from fastmetamer.metamers import generator

    joined = distributed.init_from_environment()
    graph, model, nodes, dimension_nodes = _problem(job)
    solved = []
    real = generator._generate
    generator._generate = lambda *a, **k: (solved.append(a[2].numel()), real(*a, **k))[1]
    base = _peak_gb()
    if joined:
        torch.distributed.barrier()
    started = time.perf_counter()
    res = fm.generate(model, graph, nodes, progress=False, **({"steps": 50} if job == "random" else {}))
    if dimension_nodes:
        fm.metamer_dimension(model, graph, dimension_nodes)
    seconds = time.perf_counter() - started
    rank, size = distributed.world()
    row = {"job": job, "ranks": size, "rank": rank, "seconds": seconds, "targets_solved": sum(solved),
           "peak_gb_above_start": _peak_gb() - base, "passed": float(res.passed.float().mean())}
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    if joined:
        torch.distributed.destroy_process_group()


def measure(job: str, ranks: int) -> dict:
    """The job on ``ranks`` processes (torchrun for 2): slowest rank's time, every rank's memory."""
    with tempfile.TemporaryDirectory() as out:
        launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        subprocess.run([sys.executable, *launcher, __file__, "--worker", job, out], check=True, cwd=HERE,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"job": job, "ranks": ranks, "seconds": max(r["seconds"] for r in rows),
            "seconds_per_rank": [round(r["seconds"], 2) for r in rows],
            "peak_gb_per_rank": [round(r["peak_gb_above_start"], 3) for r in rows],
            "targets_per_rank": [r["targets_solved"] for r in rows], "passed": rows[0]["passed"]}


def markdown(rows: list[dict], info: dict) -> str:
    lines = ["# Scale-out: targets shared across ranks", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "One thread per process. cora = 16 Cora node metamers (default options) + metamer dimension of 64 "
             "nodes; random = 200 node metamers (50 steps) on a random graph of 200,000 nodes. Time: the calls, "
             "slowest rank. Memory: peak RSS above the loaded graph and model, per rank.", "",
             "| job | ranks | seconds | vs one process | seconds per rank | targets per rank | peak GB per rank | passed |",
             "|---|---|---|---|---|---|---|---|"]
    single = {r["job"]: r["seconds"] for r in rows if r["ranks"] == 1}
    for r in rows:
        ratio = f"{r['seconds'] / single[r['job']]:.2f}×" if r["job"] in single else "-"
        lines.append(f"| {r['job']} | {r['ranks']} | {r['seconds']:.1f} | {ratio} | {r['seconds_per_rank']} | "
                     f"{r['targets_per_rank']} | "
                     f"{r['peak_gb_per_rank']} | {r['passed']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=["cora", "random"], choices=["cora", "random"])
    parser.add_argument("--out", default=str(HERE / "results" / "scale_out"), help="output path without suffix")
    args = parser.parse_args()
    from run_benchmarks import machine

    rows = []
    for job in args.jobs:
        for ranks in (1, 2):
            rows.append(measure(job, ranks))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, machine()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:4])
    else:
        main()
