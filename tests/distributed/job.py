"""A scale-out job, run by ``tests/test_distributed.py`` under ``torchrun`` (2 gloo ranks of one
thread each) and once as a plain process: node metamers (features and structure), metamer
dimensions and whole-graph feature metamers (partitioned on the ranks) of the built-in synthetic
graph, graph-level metamers of a batch of synthetic graphs (shared out by graph), and the
distributed top-k selection on values with ties. Every rank saves what it
returns to ``<out>/rank<r>.pt`` (the plain process: rank0.pt).

    python tests/distributed/job.py OUT          # one process
    torchrun --standalone --nproc_per_node=2 tests/distributed/job.py OUT
"""
import sys

import torch
from torch import Tensor

import fastmetamer as fm
from fastmetamer import distributed
from fastmetamer.analysis import dimension
from fastmetamer.metamers import generator

NODES = [3, 50, 4, 120, 7, 300, 11, 15, 420]  # receptive fields of unequal size
DIMENSION_NODES = list(range(0, 64, 4))
# one propagate per layer; K per layer; attention (fast engine); the model's own forward with hooks
WHOLE_GRAPHS = (("pyg_gcn", "auto"), ("appnp", "auto"), ("gat", "auto"), ("pyg_gcn", "reference"))
TOP_K = (0, 1, 17, 250, 499, 500)  # of 500 values


def model_for(graph, name: str = "pyg_gcn"):
    """A 2-layer PyG GCN (or zoo model ``name``) with fixed random weights (the comparison does
    not need training)."""
    from torch_geometric.nn.models import GCN

    torch.manual_seed(0)
    if name == "pyg_gcn":
        return GCN(graph.num_features, 16, num_layers=2, out_channels=4).eval()
    return fm.models.build_model(name, graph.num_features, 4, hidden=16).eval()


def whole_graphs(graph) -> dict:
    """Whole-graph feature metamers (binary features and continuous ones) of each model and backend."""
    noisy = graph.clone()
    noisy.x = graph.x + 0.1 * torch.randn(graph.x.shape, generator=torch.Generator().manual_seed(3))
    saved = {}
    for name, backend in WHOLE_GRAPHS:
        for binary, g in ((True, graph), (False, noisy)):
            res = fm.generate(model_for(graph, name), g, None, steps=40, progress=False, backend=backend)
            saved[f"{name}-{backend}", binary] = {"x": res.graph.x, "history": res.history, "loss": res.loss,
                                   "passed": res.passed, "trivial": res.trivial,
                                   "partition": res.settings.get("partition")}
    return saved


def graph_batch() -> dict:
    """Graph-level metamers of a batch of 7 synthetic graphs (a zoo GCN's pooled readout)."""
    from torch_geometric.data import Batch, Data

    graphs = fm.datasets.synthetic_graphs(num_graphs=30, seed=1)
    torch.manual_seed(0)
    model = fm.models.GCN(graphs[0].num_features, 2, hidden=16, pool="add").eval()
    batch = Batch.from_data_list([Data(x=g.x, edge_index=g.edge_index) for g in graphs[:7]])
    res = fm.generate(model, batch, None, layer="readout", steps=60, refine_steps=20, seed=3,
                      null_graphs=graphs[10:], progress=False)
    return {"x": res.graph.x, "n_id": res.graph.n_id, "center": res.center, "batch": res.graph.batch,
            "loss": res.loss, "history": res.history, "passed": res.passed, "trivial": res.trivial,
            "null_threshold": res.null_threshold, "metrics": res.metrics}


def selections(rank: int, world: int) -> dict:
    """top_k of 500 values with many ties (100 rows of 5, the rows dealt out to the ranks in turn):
    the global positions each rank selects and the threshold, for each k of TOP_K, with the
    candidates found by the sampled pivot and by ``torch.topk``."""
    from fastmetamer.distributed import select
    from fastmetamer.distributed.select import top_k

    values = torch.randint(0, 40, (100, 5), generator=torch.Generator().manual_seed(5)).float() / 40
    rows = torch.arange(rank, 100, world)  # positions: row * 5 + column

    def positions(selected: Tensor) -> Tensor:
        return rows[selected // 5] * 5 + selected % 5

    chosen = {k: top_k(values[rows], rows, k, chunk=7) for k in TOP_K}  # small chunks: cut ties found in parts
    margin, select.PIVOT_MARGIN = select.PIVOT_MARGIN, 0.0  # a pivot near the top: mostly torch.topk instead
    try:
        coarse = {k: top_k(values[rows], rows, k) for k in TOP_K}
    finally:
        select.PIVOT_MARGIN = margin
    return {k: [(positions(selected), threshold) for selected, threshold in (chosen[k], coarse[k])] for k in TOP_K}


def recording(module, name: str, solved: list, position: int):
    """Wrap ``module.name`` so that the targets of every call (argument ``position``) are recorded."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        if args[position] is not None:  # None: a whole graph
            solved.append(args[position].tolist())
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def main(out: str) -> None:
    torch.set_num_threads(1)
    started = distributed.init_from_environment()
    solved = {"generate": [], "dimension": []}
    recording(generator, "_generate", solved["generate"], 2)
    recording(dimension, "_solve", solved["dimension"], 1)
    graph = fm.datasets.synthetic_graph(num_nodes=600, num_features=60, seed=1)
    model = model_for(graph)
    saved = {}
    for kind in ("features", "structure"):
        res = fm.generate(model, graph, NODES, kind=kind, steps=30, refine_steps=20, progress=False)
        saved[kind] = {"x": res.graph.x, "edge_index": res.graph.edge_index, "edge_weight": getattr(res.graph, "edge_weight", None),
                       "loss": res.loss, "history": res.history, "passed": res.passed, "trivial": res.trivial,
                       "nodes": res.nodes, "center": res.center}
    for wrt in ("features", "edges"):
        dim = fm.metamer_dimension(model, graph, DIMENSION_NODES, wrt=wrt)
        saved["dimension_" + wrt] = {"rank": dim.rank, "input_dim": dim.input_dim, "log_volume": dim.log_volume,
                                     "singular_values": dim.singular_values, "nodes": dim.nodes}
    saved["solved"] = solved
    saved["whole"] = whole_graphs(graph)
    saved["graphs"] = graph_batch()
    saved["top_k"] = selections(*distributed.world())
    torch.save(saved, f"{out}/rank{distributed.world()[0]}.pt")
    if started:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
