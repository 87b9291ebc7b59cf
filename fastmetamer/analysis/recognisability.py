"""Cross-architecture recognisability of metamers (SPEC §4).

Metamers made from a source model A (matched at A's output layer, so A predicts the reference
labels) are classified by a judge model B. For every (A, B) pair we report B's accuracy on A's
metamers and on the references, with percentile-bootstrap confidence intervals over targets.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ._common import to_float64


class PairPredictions(NamedTuple):
    """Judge B's predictions for one (source A, judge B) pair, one entry per target node.

    ``metamer``: B's predictions on A's metamers; ``reference``: B's predictions on the
    references; each class ids [T] or logits/probabilities [T, C] (argmax taken).
    ``labels``: the reference labels [T] (class ids). A plain 3-tuple works too.
    """

    metamer: Tensor
    reference: Tensor
    labels: Tensor


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean of ``values`` with a percentile-bootstrap (1 - ``alpha``) confidence interval.

    ``values``: 1-D tensor [T] (e.g. 0/1 correctness per target), T ≥ 1. ``n_boot`` resamples of
    size T are drawn with replacement from a generator seeded with ``seed`` (reproducible; the
    same seed and T give the same resamples, so two calls are a paired bootstrap). Returns
    ``(mean, low, high)`` in the units of ``values``, with low ≤ high.
    """
    values = to_float64(values, "values")
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    n, gen = values.numel(), torch.Generator().manual_seed(seed)
    chunk = max(1, 2 ** 22 // n)  # bounds the [chunk, n] index matrix to ~32 MiB
    means = torch.cat([values[torch.randint(n, (min(chunk, n_boot - start), n), generator=gen)].mean(dim=1)
                       for start in range(0, n_boot, chunk)])
    low, high = torch.quantile(means, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64))
    return float(values.mean()), float(low), float(high)


def _class_ids(pred, name: str) -> Tensor:
    """Predictions as class ids [T]: 1-D input is taken as ids, 2-D input [T, C] is arg-maxed."""
    pred = torch.as_tensor(pred).detach().cpu()
    if pred.dim() == 2:
        return pred.argmax(dim=1)
    if pred.dim() != 1:
        raise ValueError(f"{name} must be class ids [T] or scores [T, C], got shape {tuple(pred.shape)}")
    if pred.is_floating_point() and not bool((pred == pred.round()).all()):
        raise ValueError(f"{name} is 1-D, so it must hold integer class ids; give scores as [T, C]")
    return pred.long()


def _pair_row(source, judge, pair, n_boot: int, seed: int, alpha: float) -> dict:
    """One tidy row of :func:`recognisability_matrix` for a (source, judge) pair."""
    metamer, reference, labels = pair
    where = f"pair ({source!r}, {judge!r})"
    labels = _class_ids(labels, f"labels of {where}")
    row = {"source": source, "judge": judge, "n": labels.numel()}
    for key, pred in (("metamer", metamer), ("reference", reference)):
        ids = _class_ids(pred, f"{key} predictions of {where}")
        if ids.shape != labels.shape:
            raise ValueError(f"{key} predictions of {where} cover {ids.numel()} targets, "
                             f"labels cover {labels.numel()}")
        acc, low, high = bootstrap_ci((ids == labels).double(), n_boot, seed, alpha)
        row.update({f"{key}_acc": acc, f"{key}_ci_low": low, f"{key}_ci_high": high})
    return row


def recognisability_matrix(predictions: Mapping[tuple[Hashable, Hashable], Sequence], *, n_boot: int = 1000,
                           seed: int = 0, alpha: float = 0.05) -> list[dict]:
    """Judge accuracy on metamers vs references for every (source, judge) pair, with bootstrap CIs.

    ``predictions``: ``{(source_A, judge_B): PairPredictions(metamer, reference, labels)}`` (or
    plain 3-tuples), see :class:`PairPredictions`. Returns one dict per pair, in input order:
    ``source``, ``judge``, ``n`` (targets), ``metamer_acc``, ``metamer_ci_low``,
    ``metamer_ci_high``, ``reference_acc``, ``reference_ci_low``, ``reference_ci_high``
    (accuracies in [0, 1], (1 - ``alpha``) percentile-bootstrap CIs with ``n_boot`` resamples,
    paired across metamer and reference). Rows go straight to ``csv.DictWriter``; use
    :func:`pivot_matrix` for a heat map.
    """
    if not predictions:
        raise ValueError("predictions is empty; give at least one (source, judge) pair")
    return [_pair_row(source, judge, pair, n_boot, seed, alpha)
            for (source, judge), pair in predictions.items()]


def pivot_matrix(rows: Sequence[dict], value: str = "metamer_acc") -> tuple[list, list, Tensor]:
    """Turn tidy rows of :func:`recognisability_matrix` into a source × judge matrix.

    Returns ``(sources, judges, matrix)``: the sources and judges in first-seen order and a
    float64 tensor [len(sources), len(judges)] holding ``row[value]``, nan for missing pairs.
    """
    sources = list(dict.fromkeys(row["source"] for row in rows))
    judges = list(dict.fromkeys(row["judge"] for row in rows))
    matrix = torch.full((len(sources), len(judges)), math.nan, dtype=torch.float64)
    for row in rows:
        if value not in row:
            raise ValueError(f"rows have no column {value!r}; available: {sorted(row)}")
        matrix[sources.index(row["source"]), judges.index(row["judge"])] = row[value]
    return sources, judges, matrix
