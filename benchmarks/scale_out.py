"""Scale-out: targets shared and whole graphs partitioned across ranks of a gloo process group,
against one process (SPEC §10).

Jobs (each rank and the single process run one thread; the model is a 2-layer zoo GCN, hidden
64: on Cora trained for 50 epochs before the clock starts, identically on every rank; on the
random graphs seeded random weights, as the cost does not depend on them):

- ``cora``: 16 Cora node metamers (default options) plus the metamer dimension of 64 nodes;
- ``random``: 200 node metamers of 50 steps on a random graph of 200,000 nodes (average
  in-degree 20, F = 100 binary features, 5% ones);
- ``many1000``: 1,000 node metamers of 50 steps on a random graph of 1,000,000 nodes (as above);
- ``whole``: a whole-graph feature metamer of 10 steps of a 1,000,000-node graph with locality
  (:func:`local_graph`: each node's in-neighbours lie within +-100 places on a ring, the ids
  shuffled; in-degree 20, F = 100 binary, 5% ones). Under torchrun it is partitioned.

Each job runs once as a plain process and once under ``torchrun --nproc_per_node=2``: time of
the calls (the slowest rank), each rank's peak resident memory above what it held once the graph
and model were ready, the share of the targets each rank solved, and for ``whole`` the halo rows
and the bytes the halo exchanges move per forward pass (the backward moves as much again).

    python benchmarks/scale_out.py [--jobs cora random many1000 whole] [--nodes N] [--update]

writes ``results/scale_out.json`` and ``results/scale_out.md``, and the model of a partitioned
whole-graph metamer of ogbn-papers100M on 8 GPUs (:func:`papers100m_model`) into the latter.
``--update`` keeps the other jobs' rows of the JSON file and the notes section (``## Notes``
onwards) of the Markdown file.
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


NODES = {"random": 200_000, "many1000": 1_000_000, "whole": 1_000_000}
TARGETS = {"cora": 16, "random": 200, "many1000": 1000}  # node targets (whole: None)
JOBS = ("cora", "random", "many1000", "whole")


def local_graph(n: int, seed: int = 0, degree: int = 20, reach: int = 100):
    """A graph with locality: node i's ``degree`` in-neighbours are drawn within ``reach`` places
    of it on a ring, then the node ids are shuffled (the partitioner has to find the order);
    binary features [n, 100] with 5% ones."""
    from torch_geometric.data import Data

    gen = torch.Generator().manual_seed(seed)
    dst = torch.arange(n).repeat_interleave(degree)
    offset = torch.randint(1, reach + 1, (n * degree,), generator=gen)
    src = (dst + torch.where(torch.rand(n * degree, generator=gen) < 0.5, offset, -offset)) % n
    ids = torch.randperm(n, generator=gen)
    x = (torch.rand(n, 100, generator=gen) < 0.05).float()
    return Data(x=x, edge_index=ids[torch.stack([src, dst])])


def _problem(job: str, nodes: int | None):
    """(graph, trained model, node targets or None, dimension targets) of a job."""
    import fastmetamer as fm

    if job == "cora":
        graph = fm.datasets.load("Cora", root=os.environ.get("FASTMETAMER_DATA", str(SHARED)))
    elif job == "whole":
        graph = local_graph(nodes or NODES[job])
    else:
        from scale import random_graph

        graph = random_graph(nodes or NODES[job])
    torch.manual_seed(0)
    model = fm.models.build_model("gcn", graph.num_features, 7, hidden=64)
    if job == "cora":
        fm.models.train(model, graph, epochs=50, seed=0)
    order = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(1))
    targets = None if job == "whole" else order[:TARGETS[job]].tolist()
    return graph, model.eval(), targets, order[:64].tolist() if job == "cora" else []


STEPS = {"random": 50, "many1000": 50, "whole": 10}  # cora: the defaults


def worker(job: str, out: str, nodes: str) -> None:
    """One process (a rank under torchrun, or alone): the job's calls, timed; writes rank<r>.json."""
    torch.set_num_threads(1)
    import fastmetamer as fm
    from fastmetamer import distributed
    from fastmetamer.metamers import generator

    joined = distributed.init_from_environment()
    graph, model, targets, dimension_nodes = _problem(job, int(nodes) or None)
    solved = []
    real = generator._generate
    generator._generate = lambda *a, **k: (solved.append(graph.num_nodes if a[2] is None else a[2].numel()),
                                           real(*a, **k))[1]
    base = _peak_gb()
    if joined:
        torch.distributed.barrier()
    started = time.perf_counter()
    res = fm.generate(model, graph, targets, progress=False, **({"steps": STEPS[job]} if job in STEPS else {}))
    if dimension_nodes:
        fm.metamer_dimension(model, graph, dimension_nodes)
    seconds = time.perf_counter() - started
    rank, size = distributed.world()
    partition = res.settings.get("partition")
    row = {"job": job, "nodes": graph.num_nodes, "ranks": size, "rank": rank, "seconds": seconds,
           "targets_solved": partition["owned_rows"][rank] if partition else sum(solved),
           "peak_gb_above_start": _peak_gb() - base, "passed": float(res.passed.float().mean()),
           "loss": float(res.loss) if targets is None else None, "partition": partition}
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    if joined:
        torch.distributed.destroy_process_group()


def measure(job: str, ranks: int, nodes: int | None) -> dict:
    """The job on ``ranks`` processes (torchrun for 2): slowest rank's time, every rank's memory."""
    with tempfile.TemporaryDirectory() as out:
        launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        subprocess.run([sys.executable, *launcher, __file__, "--worker", job, out, str(nodes or 0)], check=True,
                       cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]
    partition = rows[0]["partition"]
    return {"job": job, "nodes": rows[0]["nodes"], "ranks": ranks, "seconds": max(r["seconds"] for r in rows),
            "seconds_per_rank": [round(r["seconds"], 2) for r in rows],
            "peak_gb_per_rank": [round(r["peak_gb_above_start"], 3) for r in rows],
            "targets_per_rank": [r["targets_solved"] for r in rows], "passed": rows[0]["passed"],
            "loss": rows[0]["loss"], "halo_rows": partition["halo_rows"] if partition else None,
            "exchange_mb_per_forward": round(partition["exchange_bytes_per_forward"] / 1e6, 2) if partition else None}


def markdown(rows: list[dict], info: dict) -> str:
    lines = ["# Scale-out: targets shared and whole graphs partitioned across ranks", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "One thread per process. cora = 16 Cora node metamers (default options) + metamer dimension of 64 "
             "nodes; random = 200 node metamers (50 steps), 200,000-node random graph; many1000 = 1,000 node "
             "metamers (50 steps), 1,000,000-node random graph; whole = whole-graph feature metamer (10 steps) of a "
             "1,000,000-node graph with locality, partitioned on two ranks. Time: the calls, slowest rank. Memory: "
             "peak RSS above the loaded graph and model, per rank. Exchange: bytes the halo exchanges of one "
             "forward pass move (all ranks' blocks, as every rank receives them; the backward moves as much).", "",
             "| job | nodes | ranks | seconds | vs one process | seconds per rank | targets (rows) per rank | "
             "peak GB per rank | vs one process | halo rows per rank | exchange MB per forward | passed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    single = {r["job"]: r for r in rows if r["ranks"] == 1}
    for r in rows:
        one = single.get(r["job"])
        ratio = f"{r['seconds'] / one['seconds']:.2f}×" if one else "-"
        memory = f"{max(r['peak_gb_per_rank']) / max(one['peak_gb_per_rank']):.2f}×" if one else "-"
        lines.append(f"| {r['job']} | {r['nodes']:,} | {r['ranks']} | {r['seconds']:.1f} | {ratio} | "
                     f"{r['seconds_per_rank']} | {r['targets_per_rank']} | {r['peak_gb_per_rank']} | {memory} | "
                     f"{r['halo_rows'] or '-'} | {r['exchange_mb_per_forward'] or '-'} | {r['passed']:.2f} |")
    return "\n".join(lines) + "\n"


PAPERS100M = {"nodes": 111_059_956, "edges": 1_615_685_872, "features": 128, "classes": 172}


def papers100m_model(world: int = 8, halo_shares=(0.05, 0.25, 1.0), hidden: int = 64, edge_bytes: float = 70.0) -> str:
    """A model (arithmetic, not a measurement) of a partitioned whole-graph feature metamer of
    ogbn-papers100M on ``world`` GPUs with a 2-layer GCN (``hidden`` units, 172 outputs), for a few
    halo shares h (halo rows a rank receives per owned row; the real share depends on the
    partition and is not measured here). ``edge_bytes``: bytes per local edge of the fast
    engine's cached patterns and the step's per-edge work, as the 1M-node job's reference pass
    suggests (about 0.69 GB for a rank's 10 M local edges)."""
    n, e, f, c = (PAPERS100M[k] for k in ("nodes", "edges", "features", "classes"))
    owned = n / world
    gb = lambda b: f"{b / 1e9:,.1f}"  # noqa: E731
    state = 7 * owned * f * 4  # continuous X': parameters, noise, Adam m and v, gradient, last and best state
    graph_in = n * f * 4 + e * 2 * 8  # the whole graph every rank is given today (x float32, edge_index int64)
    lines = [f"## Model: ogbn-papers100M on {world} GPUs (arithmetic, not measured)", "",
             f"n = {n:,} nodes, E = {e:,} edges, F = {f} continuous features; 2-layer GCN, hidden {hidden}, "
             f"{c} outputs; {world} ranks of {owned:,.0f} owned nodes. Per rank, float32:", "",
             f"- optimiser state of the owned rows (7 tensors [n/{world}, F]: parameters, noise, Adam m and v, "
             f"gradient, last and best state): **{gb(state)} GB** (one process: {gb(state * world)} GB);",
             f"- the input graph, which every rank is given whole today: **{gb(graph_in)} GB** "
             "(x and edge_index); a rank that loaded only its part would need a share of it;",
             f"- the local edges' patterns (E/{world} edges plus the halo's in-edges, ~{edge_bytes:.0f} B each): "
             f"{gb(e / world * edge_bytes)} GB or more;", "",
             "| halo share h | halo rows per rank | activations GB per rank | exchange GB per step (all_gather fwd + "
             "all_reduce bwd, received per rank) | point-to-point alternative GB per step |",
             "|---|---|---|---|---|"]
    for h in halo_shares:
        halo = h * owned
        rows = owned + 2 * halo  # owned, halo and (about as many) second-ring rows
        activations = rows * (hidden * 3 + c * 2) * 4
        widths = hidden + c  # each stage exchanges its transformed input x W
        gathered = (world - 1) * halo * widths * 4  # every other rank's boundary block
        reduced = 2 * (world - 1) / world * world * halo * widths * 4  # ring all-reduce of the same buffer
        direct = 2 * halo * widths * 4  # only the rows this rank reads, both ways
        lines.append(f"| {h:g} | {halo:,.0f} | {gb(activations)} | {gb(gathered + reduced)} | {gb(direct)} |")
    lines += ["", "With the all_gather scheme every rank receives every rank's boundary block, so the exchange grows "
              f"with the world size ({world - 1} blocks per rank here) where point-to-point sends of the rows each rank "
              "reads would not. The input graph given whole to every rank is the largest single cost at this size: "
              "the next step is a loader that gives each rank its part (and the partition computed once, not on "
              "every rank)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    parser.add_argument("--nodes", type=int, default=None, help="graph size of the random/many1000/whole jobs")
    parser.add_argument("--out", default=str(HERE / "results" / "scale_out"), help="output path without suffix")
    parser.add_argument("--update", action="store_true", help="keep the other jobs' rows and the notes")
    args = parser.parse_args()
    from run_benchmarks import machine

    rows = []
    for job in args.jobs:
        for ranks in (1, 2):
            rows.append(measure(job, ranks, args.nodes))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    notes = ""
    if args.update:
        kept = [r for r in json.loads(out.with_suffix(".json").read_text())["rows"] if r["job"] not in args.jobs]
        rows = sorted(kept + rows, key=lambda r: (JOBS.index(r["job"]), r["ranks"]))
        text = out.with_suffix(".md").read_text()
        notes = text[text.index("## Notes"):] if "## Notes" in text else ""
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    text = markdown(rows, machine()) + "\n" + papers100m_model()
    out.with_suffix(".md").write_text(text + ("\n" + notes if notes else ""))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
    else:
        main()
