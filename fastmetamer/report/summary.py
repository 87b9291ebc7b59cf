"""Per-target summary rows of :class:`~fastmetamer.MetamerResult` objects."""
from __future__ import annotations

from torch import Tensor

from ..metamers.result import MetamerResult

#: Columns of the summary table the command line prints and reports.
SUMMARY_COLUMNS = ("node", "kind", "loss", "passed", "feature_cosine", "wl_similarity", "seconds")


def num_targets(result: MetamerResult) -> int:
    """Number of independent targets in ``result`` (1 for a single node)."""
    center = result.center
    return center.numel() if isinstance(center, Tensor) else 1


def _pick(value, target: int):
    """Entry ``target`` of a per-target value (list or tensor); scalars are returned as they are."""
    if isinstance(value, Tensor):
        value = value.item() if value.dim() == 0 else value[target].item()
    elif isinstance(value, (list, tuple)):
        value = value[target]
    return value


def summary_rows(result: MetamerResult) -> list[dict]:
    """One row per target: node id, kind, final loss, passed, feature cosine, WL similarity and
    the wall time of the (batched) call that produced it."""
    nodes = result.nodes if result.nodes is not None else [None]
    return [{
        "node": nodes[t],
        "kind": result.kind,
        "loss": _pick(result.loss, t),
        "passed": bool(_pick(result.passed, t)),
        "feature_cosine": _pick(result.metrics["features"]["cosine"], t),
        "wl_similarity": _pick(result.metrics["structure"]["wl"], t),
        "seconds": result.seconds,
    } for t in range(num_targets(result))]
