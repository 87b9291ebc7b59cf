"""Where a fastmetamer step spends its time: wall time inside each fused op of the step.

Runs the same cases as ``run_benchmarks.py`` (Cora, PyG GCN with hidden 64, binary features,
cpu backend), wrapping each op of the step in a timer (the ops are synchronous CPU calls, so
their wall times are exact and disjoint); the rest is Python, autograd bookkeeping and small
torch ops:

    python benchmarks/profile_step.py [--case whole|nodes64] [--steps N] [--out benchmarks/results]

writes ``profile_<case>.md``.
"""
from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from pathlib import Path

from run_benchmarks import HERE, _graph, _model, machine

#: (owner import path, attribute, label) of the timed parts of a step.
PARTS = (
    ("fastmetamer.ops.update.cpu", "top_mask_csr", "selection: top_mask_csr (C++)"),
    ("fastmetamer.ops.update.cpu", "adam_ste_update", "update: fused straight-through + margin + Adam (C++)"),
    ("fastmetamer.engines.csr:BinaryRows", "add_grad", "first-layer backward: GEMM grad @ W^T into the reused buffer"),
    ("fastmetamer.engines.csr:BinaryRows", "from_csr", "CSR of the ones of X' (bookkeeping)"),
    ("fastmetamer.ops.aggregate.cpu", "aggregate_forward", "CSR aggregation forward incl. first-layer gather (C++)"),
    ("fastmetamer.ops.aggregate.cpu", "aggregate_backward", "CSR aggregation backward (C++)"),
    ("fastmetamer.ops.loss.cpu", "matched_loss", "matched layer fused with the loss (C++)"),
)


def _instrument(seconds: dict):
    """Wrap every part of :data:`PARTS` in a timer adding to ``seconds[label]``."""
    import importlib

    for path, name, label in PARTS:
        module, _, cls = path.partition(":")
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        original = getattr(owner, name)
        is_class_method = isinstance(owner.__dict__.get(name), classmethod)
        function = original.__func__ if is_class_method else original

        @functools.wraps(function)
        def timed(*args, _function=function, _label=label, **kwargs):
            started = time.perf_counter()
            try:
                return _function(*args, **kwargs)
            finally:
                seconds[_label] += time.perf_counter() - started

        setattr(owner, name, classmethod(timed) if is_class_method else timed)


def profile(case: str, steps: int) -> tuple[float, int, dict]:
    """(seconds of the optimisation loop, steps run, {part: seconds}) for one case."""
    import fastmetamer as fm

    graph = _graph("Cora")
    model = _model("GCN", graph)
    for p in model.parameters():
        p.requires_grad_(False)
    nodes = None if case == "whole" else graph.test_mask.nonzero().flatten()[:64].tolist()
    seconds = defaultdict(float)
    _instrument(seconds)
    fm.generate(model, graph, nodes, steps=2, tol=0.0, progress=False, scores=False, backend="cpu")  # warm up
    seconds.clear()
    result = fm.generate(model, graph, nodes, steps=steps, tol=0.0, progress=False, scores=False, backend="cpu")
    return result.seconds, len(result.history), dict(seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("whole", "nodes64"), default="nodes64")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    loop, steps, seconds = profile(args.case, args.steps)
    lines = [f"# Step profile: {args.case}, Cora, PyG GCN (hidden 64), {steps} steps", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()), "",
             f"Optimisation loop: {loop:.2f} s ({1000 * loop / steps:.1f} ms/step). The op times also include"
             " the one forward pass that evaluates the final metamer.", "",
             "| part | ms/step | share of the loop |", "|---|---|---|"]
    for _, _, label in PARTS:
        lines.append(f"| {label} | {1000 * seconds.get(label, 0.0) / steps:.1f} | {seconds.get(label, 0.0) / loop:.1%} |")
    rest = loop - sum(seconds.values())
    lines.append(f"| rest: Python, autograd bookkeeping, dense x @ W of later layers, small ops | "
                 f"{1000 * rest / steps:.1f} | {rest / loop:.1%} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{args.case}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
