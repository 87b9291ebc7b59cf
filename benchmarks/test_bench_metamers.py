"""pytest-benchmark suite: fastmetamer vs the plain PyG loop on the built-in synthetic graph.

    python -m pytest benchmarks/test_bench_metamers.py --benchmark-json benchmarks/results/pytest_bench.json

Not part of the test suite (timings never gate tests); the full comparison with peak memory is
``benchmarks/run_benchmarks.py``.
"""
from __future__ import annotations

import pytest
import torch
from torch_geometric.nn import models

import fastmetamer as fm
from pyg_baseline import feature_metamer, node_metamers

STEPS = 10


@pytest.fixture(scope="module")
def graph():
    return fm.datasets.synthetic_graph(num_nodes=2000, num_features=500, seed=0)


@pytest.fixture(scope="module", params=["GCN", "GraphSAGE", "GIN"])
def model(request, graph):
    torch.manual_seed(0)
    net = getattr(models, request.param)(graph.num_features, 64, num_layers=2, out_channels=5).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.mark.benchmark(group="whole-graph")
def test_whole_graph_pyg(benchmark, graph, model):
    benchmark(feature_metamer, model, graph.x, graph.edge_index, None, STEPS)


@pytest.mark.benchmark(group="whole-graph")
def test_whole_graph_fastmetamer(benchmark, graph, model):
    benchmark(fm.generate, model, graph, None, steps=STEPS, tol=0.0, progress=False, scores=False)


@pytest.mark.benchmark(group="nodes16")
def test_nodes_pyg(benchmark, graph, model):
    nodes = list(range(16))
    benchmark(node_metamers, model, graph.x, graph.edge_index, nodes, 2, STEPS)


@pytest.mark.benchmark(group="nodes16")
def test_nodes_fastmetamer(benchmark, graph, model):
    benchmark(fm.generate, model, graph, list(range(16)), steps=STEPS, tol=0.0, progress=False, scores=False)
