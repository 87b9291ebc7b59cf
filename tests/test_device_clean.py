"""The pipeline builds nothing on the CPU when the graph and the model live on a GPU (SPEC §7).

Runs ``generate`` (both engines, every kind, node targets, a whole graph, a batch of graphs),
``metamer_dimension`` and a small study with the graph and the model on the stand-in device of
:mod:`device_audit`, which records every op that mixes a device tensor with a CPU tensor; no GPU
is needed. The fast engine runs there with the reference ops behind the ``cuda`` backend name.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch_geometric.data import Batch
from torch_geometric.nn import GCN

import fastmetamer as fm
from conftest import awkward_graph
from device_audit import DEVICE, audit, on_device
from fastmetamer.models import build_model
from fastmetamer.ops import dispatch
from fastmetamer.study.runner import run_study


@pytest.fixture(autouse=True)
def reference_ops_as_cuda(monkeypatch):
    """The ``cuda`` backend name served by the reference ops, so the fast engine runs on the
    stand-in device (the compiled backends take real tensors only)."""
    original = dispatch._module.__wrapped__

    @functools.lru_cache(maxsize=None)
    def module(op: str, backend: str):
        return original(op, "reference" if backend == "cuda" else backend)

    monkeypatch.setattr(dispatch, "_module", module)


def _report(found: dict[str, str]) -> str:
    return "\n".join(f"{line}\n    {what}" for line, what in found.items())


def _node_problem(arch: str):
    graph = awkward_graph(40, 12, seed=3, binary=True)
    model = build_model(arch, 12, 3, hidden=16).eval() if arch != "pyg-gcn" else \
        GCN(12, 16, num_layers=2, out_channels=3).eval()
    return on_device(model), on_device(graph)


@pytest.mark.parametrize("arch", ["gcn", "graphsage", "gin", "sgc", "appnp", "gat", "pyg-gcn"])
def test_node_metamers_build_nothing_on_the_cpu(arch):
    with audit() as found:
        model, graph = _node_problem(arch)
        result = fm.generate(model, graph, [1, 5, 20], steps=12, refine_steps=3)
        assert result.graph.x.device == DEVICE
    assert not found, _report(found)


@pytest.mark.parametrize("kind", ["structure", "joint"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_structure_and_joint_metamers_build_nothing_on_the_cpu(kind, backend):
    with audit() as found:
        model, graph = _node_problem("gcn")
        fm.generate(model, graph, [1, 5], kind=kind, steps=12, refine_steps=3, backend=backend)
    assert not found, _report(found)


def test_whole_graph_and_reference_engine_build_nothing_on_the_cpu():
    with audit() as found:
        model, graph = _node_problem("gcn")
        fm.generate(model, graph, None, steps=12)
        fm.generate(model, graph, [2, 7], steps=12, backend="reference", null_sample=10)
    assert not found, _report(found)


def test_graph_batches_build_nothing_on_the_cpu():
    graphs = [awkward_graph(12 + i, 6, seed=i) for i in range(4)]
    model = build_model("gin", 6, 2, hidden=8, pool="mean").eval()
    with audit() as found:
        model = on_device(model)
        batch = on_device(Batch.from_data_list(graphs[:2]))
        fm.generate(model, batch, None, layer="readout", steps=8,
                    null_graphs=[on_device(g) for g in graphs[2:]])
        fm.metamer_dimension(model, batch, layer="readout")
    assert not found, _report(found)


@pytest.mark.parametrize("wrt", ["features", "self", "edges"])
def test_dimension_builds_nothing_on_the_cpu(wrt):
    with audit() as found:
        model, graph = _node_problem("gcn")
        result = fm.metamer_dimension(model, graph, [1, 5, 20], wrt=wrt)
        assert result.rank.device == DEVICE
    assert not found, _report(found)


def test_study_builds_nothing_on_the_cpu(tmp_path):
    with audit() as found:
        run_study(tmp_path, quick=True, architectures=["gcn"], mitigations=["none"], depths=[2], widths=[16],
                  sweep_architectures=[], targets=2, steps=10, structure_targets=1, structure_steps=5,
                  epochs=(3, 3), null_graphs=4, device=str(DEVICE),
                  dataset_options={"synthetic": {"num_nodes": 60, "num_features": 16},
                                   "synthetic_graphs": {"num_graphs": 12}})
    assert "4 ok, 0 skipped, 0 failed" in (tmp_path / "study.md").read_text()
    assert not found, _report(found)


def test_the_audit_catches_cpu_tensors():
    """The check can fail: a CPU tensor mixed in, and a CPU generator drawing device values."""
    with audit() as found:
        x = on_device(torch.ones(3))
        x + torch.arange(3.0)
        torch.randn(3, generator=torch.Generator().manual_seed(0), device=x.device)
        x + torch.tensor(1.0)  # a 0-dim CPU tensor is a scalar on a GPU too
        x + torch.arange(3.0, device=x.device)
    assert len(found) == 2, _report(found)
    assert any("mixes a device tensor" in what for what in found.values())
    assert any("generator" in what for what in found.values())


def test_a_model_on_another_device_is_a_clear_error():
    model = build_model("gcn", 12, 3, hidden=16).eval()
    with audit():
        graph = on_device(awkward_graph(40, 12, seed=3))
        with pytest.raises(ValueError, match="device"):
            fm.generate(model, graph, [1], steps=2)
        with pytest.raises(ValueError, match="device"):
            fm.metamer_dimension(model, graph, [1])
