"""The activation and feature distances of many independent problems at once (SPEC §4, §9).

Each function equals the per-problem metric of :mod:`.activation` / :mod:`.features` applied to
every problem in turn (same conventions for zero rows, empty unions and ties), computed for all
problems in a few vectorised passes: no Python loop over targets. Inputs are float64-converted
like the per-problem metrics; results are float64 tensors with one entry per problem.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..validation import is_binary
from ._common import average_ranks, same_shape_pair
from .activation import _relative_sq_rows, cosine_per_row


def activation_distances_rows(a, ref) -> dict[str, Tensor]:
    """:func:`~.activation.activation_distances` of every row pair of ``a``, ``ref`` [T, d]:
    ``{"act_loss", "snr_db", "pearson", "spearman", "cosine"}``, each [T]."""
    a, ref = same_shape_pair(a, ref)
    noise, signal = (ref - a).square().sum(1), ref.square().sum(1)
    snr = torch.where(noise == 0, math.inf, torch.where(signal == 0, -math.inf,
                                                        10.0 * torch.log10(signal / noise.clamp_min(1e-300))))
    return {"act_loss": _relative_sq_rows(a, ref), "snr_db": snr, "pearson": _pearson_rows(a, ref),
            "spearman": _pearson_rows(average_ranks(a), average_ranks(ref)), "cosine": cosine_per_row(a, ref)}


def _pearson_rows(a: Tensor, ref: Tensor) -> Tensor:
    """Row-wise Pearson correlation [T], NaN for a constant row, clipped to [-1, 1]."""
    ac, rc = a - a.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True)
    norm = ac.norm(dim=1) * rc.norm(dim=1)
    corr = (ac * rc).sum(1) / norm.clamp_min(1e-300)
    return torch.where(norm == 0, math.nan, corr.clamp(-1.0, 1.0))




def feature_distances_segments(x, ref, segment: Tensor, num_segments: int,
                               binary: bool | None = None) -> dict[str, Tensor]:
    """:func:`~.features.feature_distances` of every problem: rows of ``x``, ``ref`` [m, d] with
    ``segment`` [m] = s belong to problem s (every problem has at least one row). Returns
    ``{"cosine", "relative_l2", "marginal_w1"}`` plus ``"jaccard"``, ``"hamming"`` for binary
    features (``binary=None``: when all of ``x`` and ``ref`` are 0/1), each [S]."""
    if binary is not False and isinstance(x, Tensor) and isinstance(ref, Tensor) and x.shape == ref.shape \
            and x.numel() and is_binary(x) and is_binary(ref):
        return _binary_segments(x != 0, ref != 0, segment, num_segments)
    x, ref = same_shape_pair(x, ref, ("x", "ref"))
    count = _row_counts(segment, num_segments)

    def total(values: Tensor) -> Tensor:
        return values.new_zeros(num_segments, *values.shape[1:]).index_add_(0, segment, values)

    diff, scale = total((x - ref).square().sum(1)).sqrt(), total(ref.square().sum(1)).sqrt()
    relative = torch.where(diff == 0, 0.0, torch.where(scale == 0, math.inf, diff / scale.clamp_min(1e-300)))
    out = {"cosine": total(cosine_per_row(x, ref)) / count, "relative_l2": relative}
    all_01 = bool(((x == 0) | (x == 1)).all() and ((ref == 0) | (ref == 1)).all())
    if binary and not all_01:
        raise ValueError("x or ref is not binary: Jaccard and Hamming need features that are all 0 or 1")
    if all_01:  # W1 of Bernoulli marginals by counting
        out["marginal_w1"] = ((total(x) - total(ref)).abs() / count[:, None]).mean(1)
    else:
        out["marginal_w1"] = _segment_w1(x, ref, segment, count)
    if all_01 if binary is None else binary:
        both, either = x.bool() & ref.bool(), x.bool() | ref.bool()
        inter, union = total(both.sum(1).to(x.dtype)), total(either.sum(1).to(x.dtype))
        out["jaccard"] = torch.where(union == 0, 1.0, inter / union.clamp_min(1))
        out["hamming"] = total((x != ref).sum(1).to(x.dtype)) / (count * x.shape[1])
    return {k: out[k] for k in ("cosine", "relative_l2", "marginal_w1", "jaccard", "hamming") if k in out}


def _row_counts(segment: Tensor, num_segments: int) -> Tensor:
    """[S] float64 number of rows of every problem (each must have one)."""
    count = torch.bincount(segment, minlength=num_segments).double()
    if bool((count == 0).any()):
        raise ValueError("every problem needs at least one row of features")
    return count


def _binary_segments(x: Tensor, ref: Tensor, segment: Tensor, num_segments: int) -> dict[str, Tensor]:
    """:func:`feature_distances_segments` of 0/1 features (``x``, ``ref`` [m, d] bool) from counts:
    per row the ones of x, of ref and of both; per problem and column the ones (marginal W1 of
    Bernoulli columns). Equal to the float computation, without any float copy of the features."""
    count = _row_counts(segment, num_segments)

    def total(values: Tensor) -> Tensor:
        return torch.zeros(num_segments, *values.shape[1:], dtype=torch.float64, device=values.device).index_add_(
            0, segment, values.double())

    ones_x, ones_ref, both = x.sum(1), ref.sum(1), (x & ref).sum(1)
    differ = ones_x + ones_ref - 2 * both  # squared L2 distance = Hamming distance of the row
    norms = (ones_x * ones_ref).double().sqrt()
    cosine = torch.where(norms == 0, torch.where((ones_x == 0) & (ones_ref == 0), 1.0, 0.0),
                         both.double() / norms.clamp_min(1e-300)).clamp(-1.0, 1.0)
    diff, scale = total(differ).sqrt(), total(ones_ref).sqrt()
    union = total(ones_x + ones_ref - both)
    return {"cosine": total(cosine) / count,
            "relative_l2": torch.where(diff == 0, 0.0, torch.where(scale == 0, math.inf, diff / scale.clamp_min(1e-300))),
            "marginal_w1": (total(x.float() - ref.float()).abs() / count[:, None]).mean(1),
            "jaccard": torch.where(union == 0, 1.0, total(both) / union.clamp_min(1)),
            "hamming": total(differ) / (count * x.shape[1])}


def _segment_w1(x: Tensor, ref: Tensor, segment: Tensor, count: Tensor) -> Tensor:
    """Mean over features of the W1 distance of the column values of every problem (equal row
    counts, so the mean absolute difference of the columns sorted within each problem)."""
    def by_segment_then_value(values: Tensor) -> Tensor:
        values, order = values.sort(dim=0, stable=True)
        return values.gather(0, segment[order].argsort(dim=0, stable=True))

    gaps = (by_segment_then_value(x) - by_segment_then_value(ref)).abs()
    rows_segment = segment.sort().values  # the problem of every row of the re-ordered columns
    return (x.new_zeros(count.numel(), x.shape[1]).index_add_(0, rows_segment, gaps)
            / count[:, None]).mean(1)


__all__ = ["activation_distances_rows", "feature_distances_segments"]
