"""Datasets: a built-in synthetic graph (no files) and PyG datasets loaded from a local root.

>>> from fastmetamer.datasets import load
>>> data = load("synthetic", num_nodes=500)          # Data, no files needed
>>> cora = load("cora", root="../shared/data")       # Data with the public split
>>> mutag = load("MUTAG", root="../shared/data")     # TUDataset, 188 graphs
"""
from __future__ import annotations

import re

from .pyg import NODE_DATASETS, TU_DATASETS, cache_dir, data_root, load_node_dataset, \
    load_tu_dataset
from .synthetic import synthetic_graph, synthetic_graphs

#: Names :func:`load` knows (matched ignoring case, spaces, ``-`` and ``_``); other TU
#: datasets load as ``"TU:<exact TU name>"``.
DATASET_NAMES = ("synthetic", "synthetic_graphs", *NODE_DATASETS, *TU_DATASETS)

_PREFIXED = {"Computers": "Amazon", "Photo": "Amazon", "CS": "Coauthor",
             "Physics": "Coauthor"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_CANONICAL = {_key(n): n for n in DATASET_NAMES}
_CANONICAL.update({_key(family + n): n for n, family in _PREFIXED.items()})


def canonical_name(name: str) -> str:
    """The canonical spelling of a known dataset name (``"cora"`` -> ``"Cora"``,
    ``"amazon-photo"`` -> ``"Photo"``); ``"TU:<name>"`` is returned unchanged.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name.upper().startswith("TU:"):
        return name
    try:
        return _CANONICAL[_key(name)]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)} "
                         f"(other TU datasets: 'TU:<name>')") from None


def load(name: str = "synthetic", root=None, **kwargs):
    """Load a dataset by name, case-insensitively.

    Args:
        name: one of :data:`DATASET_NAMES` (``"cora"``, ``"Amazon Photo"``, ``"mutag"``, ...)
            or ``"TU:<exact TU name>"``.
        root: data root for PyG datasets (see :func:`data_root`); unused by the synthetic ones.
        **kwargs: passed on: to :func:`synthetic_graph` / :func:`synthetic_graphs`, or to
            :func:`~fastmetamer.datasets.pyg.load_node_dataset` (``seed``, ``download``, PyG
            options) / :func:`~fastmetamer.datasets.pyg.load_tu_dataset`.

    Returns:
        Node datasets and ``"synthetic"``: one ``Data`` (``x`` ``[N, F]``, ``edge_index``
        ``[2, E]``, ``y`` ``[N]``, bool masks ``[N]``). TU datasets: the PyG ``TUDataset``
        (list-like of ``Data`` with graph label ``y`` ``[1]``). ``"synthetic_graphs"``: a list
        of ``Data``.

    Raises:
        ValueError: unknown name or bad synthetic argument.
        FileNotFoundError: raw files absent and not downloadable.
    """
    canonical = canonical_name(name)
    if canonical == "synthetic":
        return synthetic_graph(**kwargs)
    if canonical == "synthetic_graphs":
        return synthetic_graphs(**kwargs)
    if canonical in NODE_DATASETS:
        return load_node_dataset(canonical, root, **kwargs)
    return load_tu_dataset(canonical.split(":", 1)[1] if ":" in canonical else canonical,
                           root, **kwargs)


__all__ = ["load", "synthetic_graph", "synthetic_graphs", "data_root", "cache_dir",
           "canonical_name", "DATASET_NAMES"]
