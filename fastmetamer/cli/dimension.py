"""``fastmetamer dimension``: local metamer dimension and volume change for a saved model."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .. import distributed
from ..analysis.dimension import WRT, metamer_dimension
from ..report import markdown_table
from ..study import figures
from .common import add_dataset_args, add_node_args, load_node_graph, positive_int, status
from .generate import load_model, parse_layer

DIMENSION_HELP = "local metamer dimension and volume change of nodes for a saved model"


def add_parser(subparsers) -> None:
    """Register the ``dimension`` subcommand."""
    parser = subparsers.add_parser(
        "dimension", help=DIMENSION_HELP,
        description=DIMENSION_HELP + "; writes dimension.json, dimension.md and dimension.png.")
    parser.add_argument("--checkpoint", required=True, help="model checkpoint written by `fastmetamer train`")
    add_dataset_args(parser)
    add_node_args(parser, "default: every node")
    parser.add_argument("--layer", default=None,
                        help="layer: module name (e.g. layers.0) or index (default: the last)")
    parser.add_argument("--wrt", default="features", choices=WRT,
                        help="differentiate by the receptive field's features (default), the node's "
                             "own features, or the edge weights among the receptive field")
    parser.add_argument("--batch-size", type=positive_int, default=1024, help="targets per batch (default: 1024)")
    parser.add_argument("--out", default="fastmetamer-dimension", help="output folder (default: fastmetamer-dimension)")
    parser.set_defaults(run=run_dimension_command, default_threads=1)


def run_dimension_command(args: argparse.Namespace) -> int:
    """Measure the dimension, print a short summary and write the output folder."""
    graph = load_node_graph(args.dataset, args.root, args.device)
    model = load_model(args.checkpoint, graph)
    status(f"metamer dimension of {len(args.nodes) if args.nodes else 'all'} node(s) ...")
    started = time.perf_counter()
    result = metamer_dimension(model, graph, args.nodes, layer=parse_layer(args.layer), wrt=args.wrt,
                               batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    if not distributed.is_main_rank():  # under torchrun: rank 0 writes
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dimension.json").write_text(json.dumps({**result.to_dict(), "seconds": seconds}))
    rows = [{"dataset": args.dataset, "arch": model.config["name"], "node": int(v), "dimension": int(d),
             "rank": int(r), "input_dim": int(i), "rank_deficit": int(k), "log_volume": float(lv)}
            for v, d, r, i, k, lv in zip(result.nodes, result.dimension, result.rank, result.input_dim,
                                         result.rank_deficit, result.log_volume)]
    table = markdown_table(rows[:50], ("node", "dimension", "rank", "input_dim", "rank_deficit", "log_volume"))
    (out / "dimension.md").write_text(f"# Metamer dimension ({result.layer}, wrt {result.wrt})\n\n"
                                      f"{len(rows)} targets in {seconds:.1f} s; first 50:\n\n{table}")
    figures.dimension_histograms(rows, out / "dimension.png")
    print(f"{len(rows)} targets in {seconds:.1f} s: mean dimension {result.dimension.double().mean():.1f}, "
          f"mean rank deficit {result.rank_deficit.double().mean():.2f}, "
          f"mean log-volume {result.log_volume.mean():.3f}\nresults: {out}")
    return 0
