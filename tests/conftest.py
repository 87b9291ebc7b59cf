"""Shared fixtures: small graphs with awkward shapes and quickly trained models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch_geometric.data import Data

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def awkward_graph(num_nodes: int = 40, num_features: int = 12, seed: int = 0,
                  binary: bool = False) -> Data:
    """A random directed graph with isolated nodes, self loops, duplicate edges and a hub."""
    gen = torch.Generator().manual_seed(seed)
    n = num_nodes
    src = torch.randint(0, n, (3 * n,), generator=gen)
    dst = torch.randint(0, n, (3 * n,), generator=gen)
    keep = (src < n - 3) & (dst < n - 3)  # the last three nodes stay isolated
    src, dst = src[keep], dst[keep]
    hub = torch.arange(1, n - 3)
    edges = torch.cat([
        torch.stack([src, dst]),
        torch.stack([hub, torch.zeros_like(hub)]),  # node 0 is a hub
        torch.tensor([[1, 2, 2], [1, 3, 3]]),       # a self loop and a duplicate edge
    ], dim=1)
    if binary:
        x = (torch.rand(n, num_features, generator=gen) < 0.2).float()
    else:
        x = torch.randn(n, num_features, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return Data(x=x, edge_index=edges, y=y)


@pytest.fixture(scope="module")
def graph() -> Data:
    """A small awkward graph (40 nodes, 12 continuous features)."""
    return awkward_graph(num_nodes=40, num_features=12, seed=3)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline dataset folder (../shared/data); skips the test when it is absent."""
    if not (SHARED_DATA / "Planetoid").is_dir():
        pytest.skip("offline datasets not found at ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep dataset caches of the whole test session in a temporary folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTMETAMER_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def train_node_classifier(model: torch.nn.Module, data: Data, epochs: int = 100,
                          lr: float = 0.01, seed: int = 0) -> torch.nn.Module:
    """Train any ``model(x, edge_index)`` on ``data.train_mask`` with full-batch Adam."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        out = model(data.x, data.edge_index)
        torch.nn.functional.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def synthetic():
    """The built-in synthetic graph at a test-friendly size."""
    import fastmetamer as fm

    return fm.datasets.synthetic_graph(num_nodes=600, num_features=200, seed=1)


@pytest.fixture(scope="session")
def pyg_gcn(synthetic):
    """A trained 2-layer PyG GCN (hidden 32) on the synthetic graph."""
    from torch_geometric.nn.models import GCN

    torch.manual_seed(0)
    model = GCN(synthetic.num_features, 32, num_layers=2, out_channels=int(synthetic.y.max()) + 1)
    return train_node_classifier(model, synthetic)
