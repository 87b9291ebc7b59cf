"""A scale-out job, run by ``tests/test_distributed.py`` under ``torchrun`` (2 gloo ranks of one
thread each) and once as a plain process: node metamers (features and structure) and metamer
dimensions of the built-in synthetic graph. Every rank saves what it returns to
``<out>/rank<r>.pt`` (the plain process: rank0.pt).

    python tests/distributed/job.py OUT          # one process
    torchrun --standalone --nproc_per_node=2 tests/distributed/job.py OUT
"""
import sys

import torch

import fastmetamer as fm
from fastmetamer import distributed
from fastmetamer.analysis import dimension
from fastmetamer.metamers import generator

NODES = [3, 50, 4, 120, 7, 300, 11, 15, 420]  # receptive fields of unequal size
DIMENSION_NODES = list(range(0, 64, 4))


def model_for(graph):
    """A 2-layer PyG GCN with fixed random weights (the comparison does not need training)."""
    from torch_geometric.nn.models import GCN

    torch.manual_seed(0)
    return GCN(graph.num_features, 16, num_layers=2, out_channels=4).eval()


def recording(module, name: str, solved: list, position: int):
    """Wrap ``module.name`` so that the targets of every call (argument ``position``) are recorded."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
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
    torch.save(saved, f"{out}/rank{distributed.world()[0]}.pt")
    if started:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
