"""Distances between metamer node features and reference node features (SPEC §4).

Features are [n, d] tensors (one row per node). Row-aligned metrics (cosine, relative L2,
Jaccard, Hamming) need equal shapes; the marginal distance only needs equal d. Computed in
float64; NaN/Inf input raises ValueError.
"""
from __future__ import annotations

import math

from torch import Tensor

from ..validation import is_binary
from ._common import require_dim, same_shape_pair, to_float64, wasserstein1_columns
from .activation import cosine_per_row


def _features_pair(x, ref) -> tuple[Tensor, Tensor]:
    """Check and convert two [n, d] feature matrices of equal shape."""
    x, ref = same_shape_pair(x, ref, ("x", "ref"))
    require_dim(ref, 2, "x and ref", "[num_nodes, num_features]")
    return x, ref


def _binary_pair(x, ref) -> tuple[Tensor, Tensor]:
    """Check two feature matrices of equal shape whose entries are all 0 or 1; return them as bool."""
    x, ref = _features_pair(x, ref)
    for name, t in (("x", x), ("ref", ref)):
        if not is_binary(t):
            raise ValueError(f"{name} is not binary: Jaccard and Hamming need features that are all 0 or 1")
    return x.bool(), ref.bool()


def feature_cosine(x, ref) -> float:
    """Mean over nodes of the cosine similarity between rows of ``x`` and ``ref`` ([n, d] each).

    Returns a float in [-1, 1] ([0, 1] for non-negative features). A node whose two rows are both
    zero counts as 1.0 (identical); a zero row against a non-zero row counts as 0.0.
    """
    x, ref = _features_pair(x, ref)
    return float(cosine_per_row(x, ref).mean())


def relative_l2(x, ref) -> float:
    """Relative L2 (Frobenius) distance ||x - ref||_F / ||ref||_F of [n, d] feature matrices.

    Returns a float in [0, inf); 0 means identical. An all-zero ``ref`` gives 0.0 when ``x`` is
    zero too, else inf.
    """
    x, ref = _features_pair(x, ref)
    diff, scale = float((x - ref).norm()), float(ref.norm())
    if diff == 0.0:
        return 0.0
    return math.inf if scale == 0.0 else diff / scale


def jaccard(x, ref) -> float:
    """Jaccard similarity |x ∧ ref| / |x ∨ ref| of the sets of ones in binary [n, d] features.

    Returns a float in [0, 1]; two all-zero inputs give 1.0. ValueError if an entry is not 0/1.
    """
    x, ref = _binary_pair(x, ref)
    union = int((x | ref).sum())
    return 1.0 if union == 0 else int((x & ref).sum()) / union


def hamming(x, ref) -> float:
    """Normalised Hamming distance: the fraction of entries where binary [n, d] features differ.

    Returns a float in [0, 1]; 0 means identical. ValueError if an entry is not 0/1.
    """
    x, ref = _binary_pair(x, ref)
    return float((x != ref).double().mean())


def marginal_distance(x, ref) -> float:
    """Scale-aware distance between per-feature marginal distributions.

    The mean over the d features of the exact 1-D Wasserstein-1 distance between the values of
    column j of ``x`` [n, d] and of ``ref`` [m, d] (n and m may differ). In feature units, range
    [0, inf); 0 when every column has the same value distribution (rows may be permuted). For
    binary features it equals the mean over features of |freq_j(x) - freq_j(ref)|, so it sees
    word frequencies that cosine similarity hides.
    """
    x, ref = to_float64(x, "x"), to_float64(ref, "ref")
    require_dim(x, 2, "x", "[num_nodes, num_features]")
    require_dim(ref, 2, "ref", "[num_nodes, num_features]")
    if x.shape[1] != ref.shape[1] or 0 in (*x.shape, *ref.shape):
        raise ValueError(f"x and ref must be non-empty with the same number of features, "
                         f"got shapes {tuple(x.shape)} and {tuple(ref.shape)}")
    if is_binary(x) and is_binary(ref):  # W1 of two Bernoulli marginals: |p - q|, by counting
        return float((x.mean(0) - ref.mean(0)).abs().mean())
    return float(wasserstein1_columns(x, ref).mean())


def feature_distances(x, ref, binary: bool | None = None) -> dict[str, float]:
    """All feature metrics of ``x`` against ``ref`` ([n, d] each).

    Returns ``{"cosine", "relative_l2", "marginal_w1"}`` plus ``"jaccard"`` and ``"hamming"``
    for binary features. ``binary=None`` detects binary features (both inputs all 0/1);
    ``True`` forces the binary metrics (ValueError if the input is not 0/1); ``False`` omits them.
    """
    x, ref = _features_pair(x, ref)
    out = {"cosine": feature_cosine(x, ref), "relative_l2": relative_l2(x, ref),
           "marginal_w1": marginal_distance(x, ref)}
    if binary is None:
        binary = is_binary(x) and is_binary(ref)
    if binary:
        out.update(jaccard=jaccard(x, ref), hamming=hamming(x, ref))
    return out
