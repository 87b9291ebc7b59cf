"""``fastmetamer generate``: metamers of given nodes for a saved model."""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

from torch import nn
from torch_geometric.data import Data

from .. import distributed, models
from ..metamers.generator import KINDS, generate
from .common import add_dataset_args, add_node_args, load_node_graph, positive_float, positive_int, status, write_results

HELP = "generate metamers of nodes for a saved model"


def add_parser(subparsers) -> None:
    """Register the ``generate`` subcommand."""
    parser = subparsers.add_parser(
        "generate", help=HELP,
        description=HELP + "; writes results.json, report.md, PNG figures and the metamer graphs (.pt).")
    parser.add_argument("--checkpoint", required=True, help="model checkpoint written by `fastmetamer train`")
    add_dataset_args(parser)
    add_node_args(parser, "required; several targets are solved as one batch")
    parser.add_argument("--kind", default="features", choices=KINDS,
                        help="what to optimise (default: features)")
    parser.add_argument("--layer", default=None,
                        help="matched layer: module name (e.g. layers.0) or index (default: the last)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="optimisation steps (default by kind)")
    parser.add_argument("--lr", type=positive_float, default=None, help="initial learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default="fastmetamer-report",
                        help="output folder (default: fastmetamer-report)")
    parser.set_defaults(run=run)


def load_model(path: str, graph: Data) -> nn.Module:
    """Load a checkpoint and check that it fits ``graph``'s features."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        model = models.load_checkpoint(path, graph.x.device)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} is not a readable fastmetamer checkpoint ({err})") from None
    expected = model.config["in_channels"]
    if expected != graph.num_features:
        raise ValueError(f"the checkpoint expects {expected} input features but the dataset has "
                         f"{graph.num_features}; train it on the same dataset")
    return model


def parse_layer(layer: str | None) -> str | int | None:
    """A layer given on the command line: digits (optionally negative) mean an index."""
    return int(layer) if layer is not None and layer.lstrip("-").isdigit() else layer


def run(args: argparse.Namespace) -> int:
    """Generate the metamers and write the report folder."""
    if not args.nodes:
        raise ValueError("give the target node(s): --node ID (repeatable) or --nodes ID [ID ...]")
    graph = load_node_graph(args.dataset, args.root, args.device)
    model = load_model(args.checkpoint, graph)
    nodes = args.nodes[0] if len(args.nodes) == 1 else args.nodes
    status(f"{args.kind} metamers of node(s) {args.nodes} ...")
    result = generate(model, graph, nodes, layer=parse_layer(args.layer), kind=args.kind,
                      steps=args.steps, lr=args.lr, seed=args.seed)
    out = Path(args.out)
    if not distributed.is_main_rank():  # under torchrun: rank 0 writes
        return 0
    result.save(out / f"metamer_{args.kind}.pt")
    meta = {"checkpoint": args.checkpoint, "model": model.config["name"], "dataset": args.dataset,
            "layer": result.layer, "nodes": args.nodes, "steps": result.settings["steps"],
            "metamer graphs": f"metamer_{args.kind}.pt (MetamerResult.load)"}
    write_results(out, {args.kind: result}, meta)
    return 0
