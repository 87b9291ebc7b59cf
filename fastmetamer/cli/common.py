"""Helpers shared by the subcommands: argument types, dataset loading and report writing."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch_geometric.data import Data

from .. import datasets
from ..metamers.result import MetamerResult
from ..report import SUMMARY_COLUMNS, markdown_table, plot_loss_curves, result_figures, summary_rows, \
    write_report


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--dataset``, ``--root`` and ``--device``."""
    parser.add_argument("--dataset", default="synthetic",
                        help="dataset name (default: synthetic; also Cora, CiteSeer, ... with --root)")
    parser.add_argument("--root", default=None, help="data folder for PyG datasets")
    add_device_arg(parser)


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (where the graph and the model live)."""
    parser.add_argument("--device", type=device_name, default="cpu",
                        help="torch device for the graph and the model: cpu (default), cuda, cuda:1, ...")


def device_name(text: str) -> str:
    """A torch device name (argparse type): ``cpu``, ``cuda``, ``cuda:1``, ..."""
    try:
        return str(torch.device(text))
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({err})") from None


def add_node_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--node ID`` (repeatable) and ``--nodes ID [ID ...]`` (the spelling that ``torchrun``, whose
    own options ``--node-rank`` / ``--node_rank`` make ``--node`` ambiguous, passes on), both into
    ``args.nodes`` (None when neither is given)."""
    parser.add_argument("--node", dest="nodes", type=int, action="append", default=None,
                        help=f"target node id (repeat for several; {what})")
    parser.add_argument("--nodes", dest="nodes", type=int, nargs="+", action="extend",
                        help="target node ids, several at once (same as repeating --node)")


def load_node_graph(name: str, root: str | None, device: str = "cpu") -> Data:
    """Load a node-classification dataset (one graph) onto ``device``; ValueError for graph datasets."""
    graph = datasets.load(name, root=root)
    if not isinstance(graph, Data):
        raise ValueError(f"dataset {name!r} is a graph-classification dataset; this command needs a "
                         "node-classification dataset (one graph), e.g. synthetic or Cora")
    return graph.to(device)


def status(message: str) -> None:
    """Print a progress message to stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def write_results(folder, results: dict[str, MetamerResult], meta: dict) -> list[dict]:
    """Print the summary table, draw the figures and write ``report.md`` + ``results.json`` into
    ``folder``. Returns the summary rows."""
    folder = Path(folder)
    rows = [row for result in results.values() for row in summary_rows(result)]
    print(markdown_table(rows, SUMMARY_COLUMNS))
    status("drawing figures ...")
    figures = {"loss curves": plot_loss_curves(results, folder / "loss_curves.png")}
    for label, result in results.items():
        figures.update(result_figures(folder, label, result))
    report = write_report(folder, rows, results, figures, meta)
    print(f"report: {report}  ({len(figures)} figures, results.json)")
    return rows
