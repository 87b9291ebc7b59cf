"""``fastmetamer demo``: train a GCN on the synthetic graph and show its metamers."""
from __future__ import annotations

import argparse
import time

import torch
from torch_geometric.data import Data

from .. import datasets
from ..metamers.generator import generate
from .common import positive_int, status, write_results
from .train import accuracy_line, train_model

HELP = "train a GCN on the synthetic graph, make feature and structure metamers, write a report"
#: Optimisation steps per metamer kind, for the full and the quick demo.
STEPS = {False: {"features": 300, "structure": 200}, True: {"features": 60, "structure": 30}}
#: Default number of target nodes, for the full and the quick demo.
NODES = {False: 4, True: 2}


def add_parser(subparsers) -> None:
    """Register the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo", help=HELP,
        description=HELP + ". Runs on one CPU thread unless `fastmetamer --threads N demo` is given: "
                           "its problems are small, and extra threads mostly add overhead.")
    parser.add_argument("--out", default="fastmetamer-report",
                        help="output folder (default: fastmetamer-report)")
    parser.add_argument("--nodes", type=positive_int, default=None,
                        help="number of test nodes to target (default: 4, quick: 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--quick", action="store_true", help="fewer nodes and steps (a few seconds)")
    parser.set_defaults(run=run, default_threads=1)


def pick_test_nodes(graph: Data, count: int, seed: int) -> list[int]:
    """``count`` distinct test nodes drawn at random with ``seed``."""
    test = graph.test_mask.nonzero().flatten()
    if count > test.numel():
        raise ValueError(f"--nodes {count} is more than the {test.numel()} test nodes")
    order = torch.randperm(test.numel(), generator=torch.Generator().manual_seed(seed))
    return sorted(test[order[:count]].tolist())


def run(args: argparse.Namespace) -> int:
    """Run the demo end to end."""
    started = time.perf_counter()
    graph = datasets.load("synthetic")
    model, trained = train_model(graph, "gcn", hidden=64, depth=2, seed=args.seed)
    print(accuracy_line(trained))
    nodes = pick_test_nodes(graph, args.nodes or NODES[args.quick], args.seed)
    results = {}
    for kind, steps in STEPS[args.quick].items():
        status(f"{kind} metamers of test nodes {nodes} ({steps} steps) ...")
        results[kind] = generate(model, graph, nodes, kind=kind, steps=steps, seed=args.seed)
    meta = {"dataset": f"synthetic ({graph.num_nodes} nodes, {graph.num_features} binary features)",
            "model": "GCN, 2 layers, hidden 64, relu", "test accuracy": trained.test_acc,
            "layer": results["features"].layer, "nodes": nodes,
            "steps": ", ".join(f"{kind} {steps}" for kind, steps in STEPS[args.quick].items()),
            "seed": args.seed}
    write_results(args.out, results, meta)
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return 0
