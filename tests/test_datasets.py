"""Tests for fastmetamer.datasets: synthetic graphs, name dispatch, offline PyG loading."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch_geometric.datasets
from torch_geometric.utils import coalesce, contains_self_loops, is_undirected

from fastmetamer.datasets import (DATASET_NAMES, cache_dir, canonical_name, data_root, load,
                                  synthetic_graph, synthetic_graphs)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ----------------------------------------------------------------------------- synthetic

def _edge_homophily(data) -> float:
    src, dst = data.edge_index
    return (data.y[src] == data.y[dst]).float().mean().item()


def test_synthetic_same_seed_same_graph():
    a, b = synthetic_graph(num_nodes=500, seed=3), synthetic_graph(num_nodes=500, seed=3)
    for key in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(a[key], b[key]), key


def test_synthetic_different_seed_different_graph():
    a, b = synthetic_graph(num_nodes=500, seed=0), synthetic_graph(num_nodes=500, seed=1)
    assert not torch.equal(a.x, b.x)
    assert not torch.equal(a.edge_index, b.edge_index)


def test_synthetic_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    synthetic_graph(num_nodes=300)
    assert torch.equal(torch.rand(3), expected)


def test_synthetic_properties():
    data = synthetic_graph()  # defaults: 2000 nodes, 5 classes, 500 words, 15 per node
    n = data.num_nodes
    assert n == 2000 and data.x.shape == (2000, 500) and data.x.dtype == torch.float32
    assert set(data.x.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(data.x.sum(1) == 15)
    assert data.y.dtype == torch.long and set(data.y.tolist()) == set(range(5))
    assert torch.bincount(data.y).tolist() == [400] * 5
    ei = data.edge_index
    assert ei.dtype == torch.long and is_undirected(ei, num_nodes=n)
    assert not contains_self_loops(ei)
    assert torch.equal(coalesce(ei, num_nodes=n), ei)
    assert 7.0 < ei.size(1) / n <= 8.0  # mean degree about avg_degree


@pytest.mark.parametrize("homophily", [0.1, 0.5, 0.9])
def test_synthetic_homophily_as_requested(homophily):
    data = synthetic_graph(num_nodes=1500, homophily=homophily, seed=1)
    assert abs(_edge_homophily(data) - homophily) < 0.05


def test_synthetic_features_depend_on_class():
    data = synthetic_graph(num_nodes=1000, seed=2)
    means = torch.stack([data.x[data.y == c].mean(0) for c in range(5)])
    assert (means[0] - means[1]).abs().sum() > 1.0


def test_synthetic_planetoid_masks():
    data = synthetic_graph(seed=4)
    train, val, test = data.train_mask, data.val_mask, data.test_mask
    assert (int(train.sum()), int(val.sum()), int(test.sum())) == (100, 500, 1000)
    assert torch.bincount(data.y[train]).tolist() == [20] * 5
    assert not (train & val).any() and not (train & test).any() and not (val & test).any()


def test_synthetic_masks_scale_down_for_small_graphs():
    data = synthetic_graph(num_nodes=30, num_classes=3, num_features=20, avg_degree=3.0,
                           words_per_node=4)
    train, val, test = data.train_mask, data.val_mask, data.test_mask
    assert torch.bincount(data.y[train], minlength=3).min() >= 1
    assert val.any() and test.any()
    assert int(train.sum() + val.sum() + test.sum()) <= 30
    assert not (train & val).any() and not (train & test).any() and not (val & test).any()


def test_synthetic_is_fast():
    best = min(_timed(lambda: synthetic_graph(num_nodes=3000)) for _ in range(3))
    assert best < 0.5


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.mark.parametrize("kwargs", [
    dict(num_classes=1), dict(num_nodes=10, num_classes=5), dict(num_features=0),
    dict(avg_degree=0.0), dict(avg_degree=5000.0), dict(homophily=-0.1),
    dict(homophily=1.5), dict(homophily=float("nan")), dict(words_per_node=0),
    dict(num_features=10, words_per_node=11), dict(num_nodes=100.5),
])
def test_synthetic_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        synthetic_graph(**kwargs)


def test_synthetic_graphs_classes_differ_in_structure():
    graphs = synthetic_graphs(num_graphs=40, seed=5)
    assert len(graphs) == 40 and sum(int(g.y) for g in graphs) == 20
    for g in graphs:
        n = g.num_nodes
        assert 10 <= n <= 30 and g.x.shape == (n, 3) and torch.all(g.x.sum(1) == 1)
        assert g.y.shape == (1,) and g.y.dtype == torch.long
        assert is_undirected(g.edge_index, num_nodes=n)
        assert not contains_self_loops(g.edge_index)
        undirected_edges = g.edge_index.size(1) // 2
        assert undirected_edges == (n - 1 if int(g.y) == 0 else n)  # tree vs. tree + cycle
        assert torch.unique(g.edge_index).numel() == n  # connected: no isolated node


def test_synthetic_graphs_deterministic():
    a, b = synthetic_graphs(num_graphs=6, seed=1), synthetic_graphs(num_graphs=6, seed=1)
    c = synthetic_graphs(num_graphs=6, seed=2)
    assert all(torch.equal(x.edge_index, y.edge_index) and torch.equal(x.x, y.x)
               for x, y in zip(a, b))
    assert not all(x.num_nodes == y.num_nodes and torch.equal(x.edge_index, y.edge_index)
                   for x, y in zip(a, c))


@pytest.mark.parametrize("kwargs", [dict(num_graphs=0), dict(min_nodes=3),
                                    dict(min_nodes=10, max_nodes=9), dict(num_node_labels=0)])
def test_synthetic_graphs_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        synthetic_graphs(**kwargs)


# ----------------------------------------------------------------------------- names, roots

def test_load_synthetic_by_name_passes_kwargs():
    data = load("Synthetic", num_nodes=300, seed=7)
    assert torch.equal(data.edge_index, synthetic_graph(num_nodes=300, seed=7).edge_index)
    assert len(load("SYNTHETIC-graphs", num_graphs=4)) == 4
    assert load().num_nodes == 2000


@pytest.mark.parametrize("name, expected", [
    ("cora", "Cora"), ("CITESEER", "CiteSeer"), ("pubmed", "PubMed"), ("photo", "Photo"),
    ("Amazon Photo", "Photo"), ("amazon-computers", "Computers"), ("coauthor_cs", "CS"),
    ("physics", "Physics"), ("mutag", "MUTAG"), ("imdb_binary", "IMDB-BINARY"),
    ("TU:COIL-DEL", "TU:COIL-DEL"),
])
def test_canonical_names(name, expected):
    assert canonical_name(name) == expected


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'Cora2'.*Cora.*MUTAG"):
        load("Cora2")
    assert "synthetic" in DATASET_NAMES and "Cora" in DATASET_NAMES


def test_data_root_and_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FASTMETAMER_DATA", raising=False)
    monkeypatch.delenv("FASTMETAMER_CACHE", raising=False)
    assert data_root() == tmp_path / ".cache" / "fastmetamer" / "data"
    assert cache_dir() == tmp_path / ".cache" / "fastmetamer"
    monkeypatch.setenv("FASTMETAMER_DATA", "/env/data")
    monkeypatch.setenv("FASTMETAMER_CACHE", str(tmp_path / "c"))
    assert data_root() == Path("/env/data") and cache_dir() == tmp_path / "c"
    assert data_root("/arg") == Path("/arg")


# ----------------------------------------------------------------------------- PyG datasets

def _listing(root: Path) -> list:
    """Every path under root with its type, size and modification time."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            st = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_mode,
                        st.st_size, st.st_mtime_ns))
    return sorted(out)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """A temporary HOME and FASTMETAMER_CACHE; FASTMETAMER_DATA unset."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASTMETAMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTMETAMER_DATA", raising=False)
    return tmp_path


@pytest.fixture
def shared(isolated):
    """The offline raw files (skip when absent); asserts nothing was written there."""
    if not (SHARED_DATA / "Planetoid" / "Cora" / "raw").is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA}")
    before = _listing(SHARED_DATA)
    yield SHARED_DATA
    assert _listing(SHARED_DATA) == before, "something was written into the shared data"


def _split_sizes(data) -> tuple[int, int, int]:
    return int(data.train_mask.sum()), int(data.val_mask.sum()), int(data.test_mask.sum())


@pytest.mark.data
def test_cora(shared, isolated):
    data = load("cora", root=shared)
    assert data.x.shape == (2708, 1433) and data.edge_index.shape == (2, 10556)
    assert int(data.y.max()) + 1 == 7
    assert _split_sizes(data) == (140, 500, 1000)
    processed = list((isolated / "cache" / "processed").glob("*/Planetoid/Cora/processed"))
    assert len(processed) == 1 and (processed[0].parent / "raw").is_symlink()


@pytest.mark.data
def test_cora_from_env_family_folder_and_cache_reuse(shared, monkeypatch):
    monkeypatch.setenv("FASTMETAMER_DATA", str(shared))
    first = load("Cora")
    second = load("Cora", root=shared / "Planetoid")  # root = the family folder itself
    assert torch.equal(first.edge_index, second.edge_index)
    assert torch.equal(first.x, second.x)


@pytest.mark.data
def test_citeseer(shared):
    data = load("CiteSeer", root=shared)
    assert data.x.shape == (3327, 3703) and int(data.y.max()) + 1 == 6
    assert _split_sizes(data) == (120, 500, 1000)


@pytest.mark.data
def test_mutag(shared):
    dataset = load("MUTAG", root=shared)
    assert len(dataset) == 188 and dataset.num_classes == 2
    labels = torch.cat([g.y for g in dataset])
    assert torch.bincount(labels).tolist() == [63, 125]
    assert dataset[0].x.shape[1] == 7


@pytest.mark.data
def test_amazon_photo_seeded_split(shared):
    data = load("Amazon Photo", root=shared)
    assert data.x.shape == (7650, 745) and int(data.y.max()) + 1 == 8
    assert _split_sizes(data) == (160, 240, 7250)
    train, val, test = data.train_mask, data.val_mask, data.test_mask
    assert torch.bincount(data.y[train]).tolist() == [20] * 8
    assert torch.bincount(data.y[val]).tolist() == [30] * 8
    assert not (train & val).any() and not (train & test).any() and not (val & test).any()
    assert torch.equal(load("photo", root=shared, seed=0).train_mask, train)
    assert not torch.equal(load("photo", root=shared, seed=1).train_mask, train)


@pytest.mark.data
def test_missing_dataset_without_download(shared):
    with pytest.raises(FileNotFoundError, match="PubMed.*Planetoid/PubMed/raw.*FASTMETAMER_DATA"):
        load("PubMed", root=shared, download=False)


@pytest.mark.data
def test_failed_download_is_a_clear_error(shared, monkeypatch):
    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(torch_geometric.datasets.Planetoid, "download", offline)
    with pytest.raises(FileNotFoundError, match="PubMed.*download failed.*FASTMETAMER_DATA"):
        load("pubmed", root=shared)


@pytest.mark.parametrize("name, shown", [("mutag", "MUTAG"), ("TU:COIL-DEL", "COIL-DEL"),
                                         ("coauthor cs", "CS")])
def test_missing_root_without_download(isolated, name, shown):
    with pytest.raises(FileNotFoundError, match=f"'{shown}'.*nothing-here.*FASTMETAMER_DATA"):
        load(name, root=isolated / "nothing-here", download=False)


@pytest.mark.data
def test_incomplete_raw_folder_is_never_downloaded_into(shared, isolated, monkeypatch):
    root = isolated / "partial"
    raw = root / "Planetoid" / "Cora" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(shared / "Planetoid" / "Cora" / "raw" / "ind.cora.x", raw)
    calls = []
    monkeypatch.setattr(torch_geometric.datasets.Planetoid, "download", calls.append)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load("Cora", root=root)
    assert calls == [] and [p.name for p in raw.iterdir()] == ["ind.cora.x"]
