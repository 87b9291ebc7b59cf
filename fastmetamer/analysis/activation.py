"""Distances between a metamer's activations and the reference activations (SPEC §4).

Inputs are tensors of any matching shape (typically H^ℓ[S] of shape [T, d_ℓ]); scalar metrics
are taken over all entries, flattened. Everything is computed in float64; NaN/Inf input raises
ValueError.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import average_ranks, require_dim, same_shape_pair


def _relative_sq_rows(a: Tensor, ref: Tensor) -> Tensor:
    """Row-wise ||a - ref||² / ||ref||², with 0 for equal rows and inf where ref is zero but a is not."""
    num, den = (a - ref).square().sum(dim=1), ref.square().sum(dim=1)
    zero_den = torch.where(num > 0, math.inf, 0.0)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), zero_den)


def activation_loss(a, ref) -> float:
    """Relative squared activation error L_act = ||a - ref||_F² / ||ref||_F².

    ``a``, ``ref``: tensors of the same shape (e.g. [T, d_ℓ]). Returns a float in [0, inf);
    0 means identical. If ``ref`` is all zeros the value is 0.0 when ``a`` is too, else inf.
    """
    a, ref = same_shape_pair(a, ref)
    return float(_relative_sq_rows(a.reshape(1, -1), ref.reshape(1, -1))[0])


def activation_loss_per_row(a, ref) -> Tensor:
    """Per-target L_act: row t gives ||a[t] - ref[t]||² / ||ref[t]||².

    ``a``, ``ref``: [T, d]. Returns a float64 tensor [T] with values in [0, inf); a zero
    reference row gives 0.0 if ``a[t]`` is zero too, else inf.
    """
    a, ref = same_shape_pair(a, ref)
    require_dim(ref, 2, "a and ref", "[T, d]")
    return _relative_sq_rows(a, ref)


def snr_db(a, ref) -> float:
    """Signal-to-noise ratio in decibels, 10·log10(||ref||² / ||ref - a||²).

    ``a``, ``ref``: tensors of the same shape. Returns a float in (-inf, inf]: +inf when
    ``a == ref`` exactly, -inf when ``ref`` is zero and ``a`` is not. 20 dB = 1 % relative error.
    """
    a, ref = same_shape_pair(a, ref)
    noise, signal = float((ref - a).square().sum()), float(ref.square().sum())
    if noise == 0.0:
        return math.inf
    return -math.inf if signal == 0.0 else 10.0 * math.log10(signal / noise)


def pearson(a, ref) -> float:
    """Pearson correlation between the flattened entries of ``a`` and ``ref``.

    ``a``, ``ref``: tensors of the same shape. Returns a float in [-1, 1], or nan when either
    input is constant (including a single entry), where correlation is undefined.
    """
    a, ref = same_shape_pair(a, ref)
    ac, rc = a.flatten() - a.mean(), ref.flatten() - ref.mean()
    norm = float(ac.norm() * rc.norm())
    if norm == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(ac @ rc) / norm))


def spearman(a, ref) -> float:
    """Spearman rank correlation between the flattened entries of ``a`` and ``ref``.

    Pearson correlation of the ranks (ties get their average rank). ``a``, ``ref``: tensors of
    the same shape. Returns a float in [-1, 1], or nan when either input is constant.
    """
    a, ref = same_shape_pair(a, ref)
    return pearson(average_ranks(a.reshape(1, -1))[0], average_ranks(ref.reshape(1, -1))[0])


def cosine_per_row(a, ref) -> Tensor:
    """Row-wise cosine similarity of ``a`` [T, d] and ``ref`` [T, d] -> float64 tensor [T] in [-1, 1].

    Zero rows: two zero rows are identical (1.0); one zero row against a non-zero row gives 0.0.
    """
    a, ref = same_shape_pair(a, ref)
    require_dim(ref, 2, "a and ref", "[T, d]")
    na, nr = a.norm(dim=1), ref.norm(dim=1)
    cos = (a * ref).sum(dim=1) / (na * nr).clamp_min(torch.finfo(torch.float64).tiny)
    cos = torch.where((na == 0) | (nr == 0), 0.0, cos)
    return torch.where((na == 0) & (nr == 0), 1.0, cos).clamp(-1.0, 1.0)


def cosine(a, ref) -> float:
    """Cosine similarity of the flattened ``a`` and ``ref`` (same shape) -> float in [-1, 1].

    Two all-zero inputs give 1.0; an all-zero input against a non-zero one gives 0.0.
    """
    a, ref = same_shape_pair(a, ref)
    return float(cosine_per_row(a.reshape(1, -1), ref.reshape(1, -1))[0])


def activation_distances(a, ref) -> dict[str, float]:
    """All activation metrics of ``a`` against ``ref`` (same shape, e.g. [T, d_ℓ]).

    Returns ``{"act_loss", "snr_db", "pearson", "spearman", "cosine"}`` as floats; see the
    individual functions for ranges and conventions.
    """
    return {"act_loss": activation_loss(a, ref), "snr_db": snr_db(a, ref),
            "pearson": pearson(a, ref), "spearman": spearman(a, ref), "cosine": cosine(a, ref)}
