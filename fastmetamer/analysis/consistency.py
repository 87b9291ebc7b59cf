"""Consistency scores between model-space and input-space similarity (SPEC §4).

Definitions (a high score means model-like-human):

* S_match: model-space similarity, the cosine of metamer and reference activations, clipped
  to [0, 1].
* S_in: input-space similarity, clipped to [0, 1]: S_feat (feature cosine) for feature
  metamers, S_struct (WL similarity) for structure metamers, (S_feat + S_struct) / 2 for joint
  metamers. Clipping S_in too keeps C in [0, 1]; a negative cosine is as dissimilar as it gets.
* Consistency C = 1 - |S_match - S_in|. A metamer has S_match ≈ 1, so C ≈ S_in: a low C means
  the model calls very different inputs the same (over-invariance).
* Relevant metamer: S_match ≥ 0.99 and S_in ≤ 0.5 (the model matches, the input does not).

C is reported only for metamers that passed the success criterion and are not trivial (changed
the input): ``valid`` False gives C = NaN, since a metamer whose activations do not match, or an
unchanged input, says nothing about consistency. NaN entries propagate to C and count as not
relevant.
"""
from __future__ import annotations

import torch
from torch import Tensor

_KINDS = ("features", "structure", "joint")


def _similarity(s) -> Tensor:
    """A similarity (float or tensor) as a float64 tensor clipped to [0, 1]."""
    return torch.as_tensor(s, dtype=torch.float64, device="cpu").detach().clamp(0.0, 1.0)


def _input_similarity(s_feat, s_struct, kind: str) -> Tensor:
    """S_in for the metamer ``kind``, clipped to [0, 1]; ValueError if a needed input is missing."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    need = {"features": ("s_feat",), "structure": ("s_struct",), "joint": ("s_feat", "s_struct")}[kind]
    given = {"s_feat": s_feat, "s_struct": s_struct}
    missing = [name for name in need if given[name] is None]
    if missing:
        raise ValueError(f"kind={kind!r} needs {' and '.join(need)}; missing {', '.join(missing)}")
    return torch.stack(torch.broadcast_tensors(*[_similarity(given[name]) for name in need])).mean(dim=0)


def relevant_share(s_match, s_in, match_min: float = 0.99, input_max: float = 0.5) -> float:
    """Share of relevant metamers: targets with S_match ≥ ``match_min`` and S_in ≤ ``input_max``.

    ``s_match``, ``s_in``: floats or 1-D tensors [T] (broadcast against each other), clipped to
    [0, 1] first. Returns a float in [0, 1] (0.0 or 1.0 for a single target).
    """
    s_match, s_in = torch.broadcast_tensors(_similarity(s_match), _similarity(s_in))
    if s_match.numel() == 0:
        raise ValueError("relevant_share needs at least one target, got empty similarities")
    return float(((s_match >= match_min) & (s_in <= input_max)).double().mean())


def consistency_scores(s_match, s_feat=None, s_struct=None, kind: str = "features", valid=None) -> dict:
    """Consistency scores of metamers (see the module docstring for the definitions).

    ``s_match``: cosine of metamer vs reference activations; ``s_feat``: feature similarity;
    ``s_struct``: structure (WL) similarity; each a float or a 1-D tensor [T] (one per target).
    ``kind``: "features" (needs ``s_feat``), "structure" (needs ``s_struct``) or "joint" (both).
    ``valid``: bool or bool tensor [T], the metamers that passed and are not trivial (None: all);
    C is NaN elsewhere.
    Returns a dict with ``"s_match"``, ``"s_in"``, ``"consistency"`` (floats when every input is
    a scalar, else float64 tensors [T], all in [0, 1]), their means ``"s_match_mean"``,
    ``"s_in_mean"``, ``"consistency_mean"`` and ``"relevant_share"`` (floats).
    """
    s_in = _input_similarity(s_feat, s_struct, kind)
    s_match, s_in = torch.broadcast_tensors(_similarity(s_match), s_in)
    if s_match.dim() > 1 or s_match.numel() == 0:
        raise ValueError(f"similarities must be floats or non-empty 1-D tensors [T], "
                         f"got shape {tuple(s_match.shape)}")
    consistency = 1.0 - (s_match - s_in).abs()
    if valid is not None:
        valid = torch.as_tensor(valid, dtype=torch.bool, device="cpu").expand_as(consistency)
        consistency = torch.where(valid, consistency, torch.full_like(consistency, float("nan")))
    scores = {"s_match": s_match, "s_in": s_in, "consistency": consistency}
    means = {f"{key}_mean": float(value.mean()) for key, value in scores.items()}
    if s_match.dim() == 0:
        scores = {key: float(value) for key, value in scores.items()}
    return {**scores, **means, "relevant_share": relevant_share(s_match, s_in)}
