"""PyG datasets (Planetoid, Amazon, Coauthor, TU) that never write into the data root.

Where the raw files are looked for (first hit wins), for family F (``Planetoid``, ``Amazon``,
``Coauthor``, ``TUDataset``) and dataset folder N (``Cora``, ``Photo``, ``MUTAG``, ...):

1. ``<root>/F/N/raw`` — ``root`` is a folder holding ``Planetoid/``, ``TUDataset/``, ... (the
   main layout, as in the project's ``shared/data``);
2. ``<root>/N/raw`` — ``root`` is the family folder itself (PyG's own ``root`` argument).

``root`` is :func:`data_root`: the argument, else ``$FASTMETAMER_DATA``, else
``~/.cache/fastmetamer/data``. The root is treated as read-only, always: PyG is run on a
work folder ``<cache>/processed/<hash of the family folder>/F`` whose ``N/raw`` is a symlink
to the raw folder found, so PyG's ``processed/`` output lands in the cache (``<cache>`` is
:func:`cache_dir`). If no raw folder is found, PyG downloads into the work folder (when
``download=True`` and online); if that fails, a :class:`FileNotFoundError` names the dataset,
the paths searched and ``FASTMETAMER_DATA``. Processed files are not re-checked against the raw
files: after changing raw files, pass ``force_reload=True``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from torch_geometric import datasets as pyg_datasets
from torch_geometric.data import Data

from .splits import per_class_split

#: Node-classification datasets: canonical name -> PyG family.
NODE_DATASETS = {"Cora": "Planetoid", "CiteSeer": "Planetoid", "PubMed": "Planetoid",
                 "Computers": "Amazon", "Photo": "Amazon", "CS": "Coauthor",
                 "Physics": "Coauthor"}
#: Well-known TU datasets (any other TU name loads with ``load("TU:<exact name>")``).
TU_DATASETS = ("MUTAG", "PROTEINS", "PROTEINS_full", "ENZYMES", "NCI1", "NCI109", "DD",
               "PTC_MR", "BZR", "COX2", "DHFR", "AIDS", "Mutagenicity", "FRANKENSTEIN",
               "COLLAB", "IMDB-BINARY", "IMDB-MULTI", "REDDIT-BINARY", "REDDIT-MULTI-5K")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder searched for raw files: ``root``, else ``$FASTMETAMER_DATA``, else
    ``~/.cache/fastmetamer/data`` (``~`` expanded, not resolved)."""
    chosen = root if root is not None else os.environ.get("FASTMETAMER_DATA")
    return Path(chosen or "~/.cache/fastmetamer/data").expanduser()


def cache_dir() -> Path:
    """The writable cache for processed files and downloads: ``$FASTMETAMER_CACHE``, else
    ``~/.cache/fastmetamer``."""
    return Path(os.environ.get("FASTMETAMER_CACHE") or "~/.cache/fastmetamer").expanduser()


class _Guarded:
    """Mixin for a PyG dataset class: turns a missing or failed download into a
    :class:`FileNotFoundError` that says where the raw files were looked for."""

    def __init__(self, root: str, name: str, *, searched: list[Path], allow_download: bool,
                 **kwargs) -> None:
        self._label, self._searched, self._allow_download = name, searched, allow_download
        super().__init__(root, name, **kwargs)

    def _missing(self, why: str) -> FileNotFoundError:
        paths = ", ".join(str(p) for p in self._searched)
        return FileNotFoundError(
            f"dataset {self._label!r}: raw files not found (searched {paths}; work folder "
            f"{self.raw_dir}) and {why}. Put PyG's raw files in <root>/<Family>/<Name>/raw "
            f"and pass root=<root> or set FASTMETAMER_DATA=<root>, or retry online.")

    def download(self) -> None:
        if not self._allow_download:
            raise self._missing("download=False")
        if os.path.islink(self.raw_dir):  # never download into the data root
            raise self._missing(f"{os.path.realpath(self.raw_dir)} is incomplete")
        try:
            super().download()
        except Exception as err:  # network errors come in many types (urllib, fsspec, ...)
            raise self._missing(f"the download failed ({type(err).__name__}: {err})") from err


class Planetoid(_Guarded, pyg_datasets.Planetoid):
    """:class:`torch_geometric.datasets.Planetoid` with a clear offline error."""


class Amazon(_Guarded, pyg_datasets.Amazon):
    """:class:`torch_geometric.datasets.Amazon` with a clear offline error."""


class Coauthor(_Guarded, pyg_datasets.Coauthor):
    """:class:`torch_geometric.datasets.Coauthor` with a clear offline error."""


class TUDataset(_Guarded, pyg_datasets.TUDataset):
    """:class:`torch_geometric.datasets.TUDataset` with a clear offline error."""


_CLASSES = {"Planetoid": Planetoid, "Amazon": Amazon, "Coauthor": Coauthor,
            "TUDataset": TUDataset}


def _candidates(root: Path, family: str, name: str) -> list[Path]:
    """Dataset folders (holding ``raw/``) to search, in order."""
    return [root / family / name, root / name]


def _link_raw(source: Path, work: Path) -> None:
    """Symlink every ``raw*`` entry of dataset folder ``source`` into ``work`` (kept if
    already there, so a finished download or a matching link is reused)."""
    work.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        link = work / entry.name
        if entry.name.startswith("raw") and not os.path.lexists(link):
            try:
                link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
            except FileExistsError:  # another process linked it first
                pass


def _open(family: str, name: str, root, download: bool, **kwargs):
    """Instantiate PyG's ``family`` dataset ``name`` on a cache work folder (see module doc)."""
    searched = _candidates(data_root(root), family, name)
    source = next((p for p in searched if (p / "raw").is_dir()), None)
    family_dir = (source.parent if source else searched[0].parent).resolve()
    key = hashlib.sha256(str(family_dir).encode()).hexdigest()[:16]
    work = cache_dir() / "processed" / key / family
    if source is not None:
        _link_raw(source, work / name)
    return _CLASSES[family](str(work), name, searched=[p / "raw" for p in searched],
                            allow_download=download, **kwargs)


def load_node_dataset(name: str, root=None, *, seed: int = 0, download: bool = True,
                      **kwargs) -> Data:
    """One node-classification graph from :data:`NODE_DATASETS` (exact canonical name).

    Planetoid graphs keep their public split (140/500/1000 for Cora); Amazon and Coauthor
    graphs get a seeded split of 20 training and 30 validation nodes per class, every other
    node testing (Shchur et al., 2018).

    Args:
        name: e.g. ``"Cora"``, ``"Photo"``, ``"CS"``.
        root: data root (see :func:`data_root`).
        seed: seed of the Amazon/Coauthor split (ignored for Planetoid).
        download: allow PyG to download missing raw files.
        **kwargs: passed to the PyG dataset class (e.g. ``transform``, ``force_reload``).

    Returns:
        ``Data`` with ``x`` ``[N, F]`` float32, ``edge_index`` ``[2, E]`` long, ``y`` ``[N]``
        long, and bool ``train_mask`` / ``val_mask`` / ``test_mask`` ``[N]``.

    Raises:
        FileNotFoundError: raw files absent and not downloadable.
    """
    family = NODE_DATASETS[name]
    data = _open(family, name, root, download, **kwargs)[0]
    if family != "Planetoid":
        data.train_mask, data.val_mask, data.test_mask = per_class_split(data.y, 20, 30, seed)
    return data


def load_tu_dataset(name: str, root=None, *, download: bool = True,
                    **kwargs) -> pyg_datasets.TUDataset:
    """A TU graph-classification dataset by its exact TU name (e.g. ``"MUTAG"``).

    Args:
        name: TU name, case as on the TU site.
        root: data root (see :func:`data_root`).
        download: allow PyG to download missing raw files.
        **kwargs: passed to :class:`torch_geometric.datasets.TUDataset` (e.g.
            ``use_node_attr=True``).

    Returns:
        The dataset (list-like of ``Data``; each with ``x`` ``[n_i, F]``, ``edge_index``
        ``[2, E_i]`` and graph label ``y`` ``[1]``).

    Raises:
        FileNotFoundError: raw files absent and not downloadable.
    """
    return _open("TUDataset", name, root, download, **kwargs)
