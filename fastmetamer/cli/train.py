"""``fastmetamer train``: train a zoo model on a node-classification dataset and save it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch_geometric.data import Data

from .. import models
from .common import add_dataset_args, load_node_graph, positive_int, status

HELP = "train a model-zoo GNN and save a checkpoint"


def add_parser(subparsers) -> None:
    """Register the ``train`` subcommand."""
    parser = subparsers.add_parser("train", help=HELP, description=HELP + " (node classification).")
    parser.add_argument("--model", default="gcn", type=str.lower, choices=models.MODEL_NAMES,
                        help="architecture (default: gcn)")
    add_dataset_args(parser)
    parser.add_argument("--hidden", type=positive_int, default=64, help="hidden width (default: 64)")
    parser.add_argument("--depth", type=positive_int, default=2, help="number of layers (default: 2)")
    parser.add_argument("--act", default="relu", choices=sorted(models.ACTIVATIONS),
                        help="activation (default: relu)")
    parser.add_argument("--residual", action="store_true", help="add residual connections")
    parser.add_argument("--epochs", type=positive_int, default=200, help="maximum epochs (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", required=True, help="checkpoint file to write, e.g. ckpt.pt")
    parser.set_defaults(run=run)


def train_model(graph: Data, name: str, *, hidden: int = 64, depth: int = 2, act: str = "relu",
                residual: bool = False, epochs: int = 200,
                seed: int = 0) -> tuple[nn.Module, models.TrainResult]:
    """Build the zoo model ``name`` for ``graph`` (initialised from ``seed``) and train it
    (progress bar on a terminal)."""
    torch.manual_seed(seed)
    model = models.build_model(name, graph.num_features, int(graph.y.max()) + 1, hidden=hidden,
                               depth=depth, act=act, residual=residual).to(graph.x.device)
    status(f"training {name} (hidden {hidden}, depth {depth}, {act}{', residual' if residual else ''}) ...")
    result = models.train(model, graph, epochs=epochs, seed=seed, progress=sys.stderr.isatty())
    return result.model, result


def accuracy_line(result: models.TrainResult) -> str:
    """One line with train / val / test accuracy and the kept epoch."""
    return (f"accuracy: train {result.train_acc:.3f}  val {result.val_acc:.3f}  "
            f"test {result.test_acc:.3f}  (best epoch {result.best_epoch})")


def run(args: argparse.Namespace) -> int:
    """Train, print accuracies and save the checkpoint."""
    graph = load_node_graph(args.dataset, args.root, args.device)
    model, result = train_model(graph, args.model, hidden=args.hidden, depth=args.depth, act=args.act,
                                residual=args.residual, epochs=args.epochs, seed=args.seed)
    print(accuracy_line(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models.save_checkpoint(model, out)
    print(f"checkpoint: {out}")
    return 0
