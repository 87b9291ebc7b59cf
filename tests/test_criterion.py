"""The success criterion's null set: every real node by default (one cached whole-graph pass),
a random sample only when the caller asks for one, and the result says which."""
from __future__ import annotations

import pytest
import torch

import fastmetamer as fm
from fastmetamer.graph import layers
from fastmetamer.graph.layers import full_graph_activations, layer_output

STEPS = dict(steps=30, progress=False, scores=False, refine_steps=0)


@pytest.fixture()
def zoo_gcn():
    torch.manual_seed(0)
    return fm.models.GCN(12, 3, hidden=8, depth=2).eval()


def counting(monkeypatch, graph):
    """Record the whole-graph passes: calls of ``layer_output`` on ``graph``'s own features."""
    calls = []
    real = layers.layer_output

    def spy(model, layer, x, *args, **kwargs):
        if x is graph.x:
            calls.append(layer)
        return real(model, layer, x, *args, **kwargs)

    monkeypatch.setattr(layers, "layer_output", spy)
    return calls


def test_whole_graph_pass_is_cached_until_model_or_graph_changes(graph, zoo_gcn, monkeypatch):
    calls = counting(monkeypatch, graph)
    first = full_graph_activations(zoo_gcn, "layers.1", graph)
    assert torch.equal(first, layer_output(zoo_gcn, "layers.1", graph.x, graph.edge_index))
    assert full_graph_activations(zoo_gcn, "layers.1", graph) is first and calls == ["layers.1"]
    before = full_graph_activations(zoo_gcn, "layers.0", graph)  # another layer: a new pass
    with torch.no_grad():
        next(zoo_gcn.parameters()).add_(1.0)  # a training step in place
    changed = full_graph_activations(zoo_gcn, "layers.0", graph)
    assert calls == ["layers.1", "layers.0", "layers.0"]
    assert torch.equal(changed, layer_output(zoo_gcn, "layers.0", graph.x, graph.edge_index))
    assert not torch.equal(changed, before)
    other = graph.clone()  # equal values, other tensors: a new pass
    assert torch.equal(full_graph_activations(zoo_gcn, "layers.0", other), changed)
    assert layers._LAST_PASS.refs[1]() is other.x


def test_generate_reuses_the_cached_pass(graph, zoo_gcn, monkeypatch):
    calls = counting(monkeypatch, graph)
    fm.generate(zoo_gcn, graph, 4, **STEPS)
    fm.generate(zoo_gcn, graph, [5, 6], **STEPS)
    assert len(calls) == 1  # one pass over the whole graph for both calls


def test_null_set_is_every_node_unless_a_sample_is_asked_for(graph, zoo_gcn):
    """A sampled null set can only miss near neighbours: its thresholds are never below the
    exact ones, and the result records the sample size."""
    nodes = [0, 4, 7, 20]
    exact = fm.generate(zoo_gcn, graph, nodes, **STEPS)
    acts = layer_output(zoo_gcn, exact.layer, graph.x, graph.edge_index).double()
    dist = torch.cdist(acts[nodes], acts)
    dist[torch.arange(len(nodes)), torch.tensor(nodes)] = float("inf")
    dist[dist <= 1e-6 * acts[nodes].norm(dim=1, keepdim=True)] = float("inf")  # twins left out
    assert torch.allclose(exact.null_threshold.double(), dist.min(1).values, rtol=1e-5)
    assert exact.settings["null_sample"] is None
    sampled = fm.generate(zoo_gcn, graph, nodes, null_sample=5, **STEPS)
    assert sampled.settings["null_sample"] == 5
    assert bool((sampled.null_threshold >= exact.null_threshold).all())
    assert bool((sampled.null_threshold > exact.null_threshold).any())


def test_whole_graph_metamer_makes_one_pass_for_reference_and_criterion(graph, zoo_gcn, monkeypatch):
    calls = counting(monkeypatch, graph)
    fm.generate(zoo_gcn, graph, None, **STEPS)
    assert len(calls) == 1
