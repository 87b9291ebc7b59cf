"""``fastmetamer study``: the invariance study (datasets x architectures x mitigations x layers).

Runs with 1 torch thread by default (many small problems run fastest single-threaded);
``--threads`` overrides.
"""
from __future__ import annotations

import argparse
import time

from .. import distributed
from ..study.config import ARCHITECTURES, MITIGATIONS
from ..study.runner import run_study
from .common import add_device_arg, positive_int

STUDY_HELP = "run the invariance study (datasets x architectures x mitigations x layers)"


def add_parser(subparsers) -> None:
    """Register the ``study`` subcommand."""
    parser = subparsers.add_parser(
        "study", help=STUDY_HELP,
        description=STUDY_HELP + "; resumable: finished cells in --out are not recomputed. Writes "
                    "study.md, study.csv, targets.csv, cross_architecture.csv and figures/*.png.")
    parser.add_argument("--out", default="fastmetamer-study", help="output folder (default: fastmetamer-study)")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized preset: small synthetic node and graph data, 3 architectures, "
                             "2 mitigations, few targets and steps (about a minute)")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="datasets (default: synthetic Cora CiteSeer MUTAG PROTEINS)")
    parser.add_argument("--architectures", nargs="+", type=str.lower, choices=ARCHITECTURES, default=None,
                        help="architectures of the base grid (default: all)")
    parser.add_argument("--mitigations", nargs="+", default=None,
                        help=f"'none' or '+'-joined subsets of {', '.join(MITIGATIONS)} "
                             "(default: none and every combination)")
    parser.add_argument("--depths", nargs="+", type=positive_int, default=None, help="depth sweep (default: 2 3 4)")
    parser.add_argument("--widths", nargs="+", type=positive_int, default=None,
                        help="width sweep (default: 16 64 256)")
    parser.add_argument("--sweep-architectures", nargs="+", type=str.lower, choices=ARCHITECTURES, default=None,
                        help="architectures swept over depth and width (default: gcn graphsage)")
    parser.add_argument("--targets", type=positive_int, default=None, help="targets per cell (default: 32)")
    parser.add_argument("--steps", type=positive_int, default=None, help="metamer steps (default: 1000)")
    parser.add_argument("--structure-targets", type=int, default=None,
                        help="targets of the structure-metamer cells (default: 16; 0 leaves them out)")
    parser.add_argument("--structure-steps", type=positive_int, default=None,
                        help="steps of the structure-metamer cells (default: 400)")
    parser.add_argument("--seeds", type=positive_int, default=None, help="training seeds (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--root", default=None, help="data folder for PyG datasets")
    add_device_arg(parser)
    parser.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN",
                        help="leave out cells whose key matches a shell-style pattern, e.g. "
                             "'Cora-appnp-*-layers.2*' (keys are the file names in OUT/cells)")
    parser.add_argument("--report-only", action="store_true",
                        help="run no cell: write the report from the cells finished in --out so far "
                             "(cached cross-architecture rows get the shuffled-features control)")
    parser.set_defaults(run=run_study_command, default_threads=1)


def run_study_command(args: argparse.Namespace) -> int:
    """Run the study and print where the report is."""
    started = time.perf_counter()
    report = run_study(args.out, quick=args.quick, datasets=args.datasets, architectures=args.architectures,
                       mitigations=args.mitigations, depths=args.depths, widths=args.widths,
                       sweep_architectures=args.sweep_architectures, targets=args.targets,
                       steps=args.steps, seeds=args.seeds, root=args.root, seed=args.seed,
                       report_only=args.report_only, device=args.device,
                       **{key: value for key in ("structure_targets", "structure_steps", "exclude")
                          if (value := getattr(args, key)) is not None})
    if distributed.is_main_rank():
        print(f"report: {report}  ({time.perf_counter() - started:.0f} s)")
    return 0
