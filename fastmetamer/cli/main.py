"""Entry point of the ``fastmetamer`` command line.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers
the subcommand and sets ``run`` (``args -> exit code``) and optionally ``default_threads`` (torch
CPU threads unless ``--threads`` is given); add new ones to :data:`COMMANDS`.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .. import __version__, distributed
from . import demo, dimension, generate, study, train
from .common import positive_int

COMMANDS = (demo, train, generate, dimension, study)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="fastmetamer",
        description="Model metamers of graph neural networks: inputs a GNN cannot tell apart.")
    parser.add_argument("--version", action="version", version=f"fastmetamer {__version__}")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: 1 for demo, torch's choice otherwise; "
                             "1 is often fastest for small graphs, and much faster on a busy machine)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code:
    0 on success, 2 for bad input (argparse errors, or a ValueError / TypeError /
    FileNotFoundError from the library, printed as ``error: ...`` without a traceback).

    Started by ``torchrun`` with several processes, it joins their process group (gloo on CPU,
    NCCL on GPU): ``generate`` and ``dimension`` share their targets out across the ranks and
    rank 0 writes the outputs."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    threads = torch.get_num_threads()
    joined = distributed.init_from_environment()
    try:
        torch.set_num_threads(args.threads or getattr(args, "default_threads", None) or threads)
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fastmetamer {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        if joined:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
