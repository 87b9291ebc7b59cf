"""The fast engine (lowered programs over fused ops) against the reference autograd engine."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.nn.models import GAT, GCN, GIN, GraphSAGE

import fastmetamer as fm
from fastmetamer.engines import FastEngine, ReferenceEngine, Unsupported, lower, make_engine
from fastmetamer.graph.layers import count_hops, layer_output, resolve_layer
from fastmetamer.graph.subgraph import disjoint_receptive_fields, whole_graph
from fastmetamer.engines.csr import BinaryRows
from fastmetamer.ops import dispatch
from fastmetamer.ops.update import reference as upd_ref

from conftest import awkward_graph

KERNEL_BACKENDS = [b for b in ("reference", "cpu") if dispatch.is_available(b)]


def _models(d: int) -> dict:
    torch.manual_seed(0)
    return {
        "zoo-gcn-elu-res": fm.models.GCN(d, 3, hidden=8, act="elu", residual=True),
        "zoo-sage-tanh-3": fm.models.GraphSAGE(d, 3, hidden=8, depth=3, act="tanh"),
        "zoo-sage-res": fm.models.GraphSAGE(d, 3, hidden=8, residual=True),
        "zoo-gin": fm.models.GIN(d, 3, hidden=8),
        "zoo-gcn-gelu-res-id": fm.models.GCN(d, 8, hidden=8, act="gelu", residual=True),
        "pyg-gcn": GCN(d, 8, 2, 3),
        "pyg-sage-elu": GraphSAGE(d, 8, 2, 3, act="elu"),
        "pyg-gin-leaky": GIN(d, 8, 2, 3, act="leaky_relu"),
        "zoo-sgc-k3": fm.models.SGC(d, 3, K=3),
        "zoo-sgc-k1": fm.models.SGC(d, 3, K=1),
        "zoo-appnp-res": fm.models.APPNP(d, 3, hidden=8, K=3, alpha=0.2, act="elu", residual=True),
        "zoo-appnp-1": fm.models.APPNP(d, 3, hidden=8, depth=1, K=2),
        "zoo-gat-h2-elu-res": fm.models.GAT(d, 3, hidden=8, heads=2, act="elu", residual=True),
        "zoo-gatv2": fm.models.GATv2(d, 3, hidden=8),
        "zoo-gatv2-shared-h2": fm.models.GATv2(d, 3, hidden=8, heads=2, share_weights=True),
        "pyg-gat-h2": GAT(d, 8, 2, 3, heads=2),
        "pyg-gatv2": GAT(d, 8, 2, 3, v2=True),
    }


def _problems(graph, model, layer):
    hops = count_hops(model, layer, graph.x)
    targets = torch.tensor([0, 5, graph.num_nodes - 1])
    yield disjoint_receptive_fields(graph.x, graph.edge_index, None, targets, hops), False
    yield whole_graph(graph.x, graph.edge_index, None), True


def _engine_cases(graph, backend):
    """(name, model, layer, sub, joint, target, fast engine) for every lowered model, its first
    and last layer, and both problems of :func:`_problems` (target: activations + 0.1)."""
    for name, model in _models(graph.num_features).items():
        model.eval()
        for layer in (resolve_layer(model, 0), resolve_layer(model, None)):
            for sub, joint in _problems(graph, model, layer):
                with torch.no_grad():
                    target = layer_output(model, layer, sub.x, sub.edge_index)[sub.center] + 0.1
                yield name, model, layer, sub, joint, target, FastEngine(lower(model, layer), backend, model, sub,
                                                                        target, joint)


def _loss_and_grads(engine, sub, weight):
    x = sub.x.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    losses = engine.losses(x, sub.edge_index, w)
    (losses * torch.arange(1, losses.numel() + 1)).sum().backward()
    return losses.detach(), x.grad, w.grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_engine_matches_reference(backend, seed):
    """Loss, feature gradient and edge-weight gradient agree for every lowered model, for the
    first and the last layer, batched receptive fields and the whole graph."""
    graph = awkward_graph(num_nodes=30, num_features=7, seed=seed)
    for name, model, layer, sub, joint, target, fast in _engine_cases(graph, backend):
        ref = ReferenceEngine(model, layer, sub, target, joint)
        weight = torch.rand(sub.edge_index.shape[1], generator=torch.Generator().manual_seed(seed))
        for got, want, what in zip(_loss_and_grads(fast, sub, weight), _loss_and_grads(ref, sub, weight),
                                   ("loss", "grad x", "grad edge weight")):
            if want is None:  # the model ignores edge weights
                assert got is None or not got.any(), (name, layer, what)
                continue
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} {layer} {what}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fast_target_outputs_match_reference_activations(backend):
    """The targets' activations through the lowered program (only the rows that reach the
    targets computed) and their gradients w.r.t. features and edge weights."""
    graph = awkward_graph(num_nodes=30, num_features=7, seed=2)
    for name, model, layer, sub, joint, target, fast in _engine_cases(graph, backend):
        ref = ReferenceEngine(model, layer, sub, target, joint)
        weight = torch.rand(sub.edge_index.shape[1], generator=torch.Generator().manual_seed(1))
        results = []
        for engine in (fast, ref):
            x = sub.x.clone().requires_grad_()
            w = weight.clone().requires_grad_()
            out = engine.target_outputs(x, sub.edge_index, w)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results.append((out.detach(), x.grad, w.grad))
        for got, want, what in zip(*results, ("outputs", "grad x", "grad edge weight")):
            if want is None:
                assert got is None or not got.any(), (name, layer, what)
                continue
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} {layer} {what}")


def _binary_rows(sub, include_frozen: bool) -> BinaryRows:
    """The sub-problem's features as BinaryRows: the free rows' ones (all rows: rows=None),
    plus the frozen rows' ones when asked; a NaN-filled gradient buffer."""
    rows = sub.free.nonzero().flatten()
    rowptr, col = upd_ref.mask_to_csr(sub.x[rows])
    frozen = None
    if include_frozen:
        frozen_rows = (~sub.free).nonzero().flatten()
        row, col_frozen = sub.x[frozen_rows].nonzero().unbind(1)
        frozen = (frozen_rows[row], col_frozen)
    grad = torch.full((rows.numel(), sub.x.shape[1]), float("nan"))
    return BinaryRows.from_csr(rowptr, col, None if bool(sub.free.all()) else rows, sub.num_nodes, grad,
                               torch.zeros((), requires_grad=True), frozen)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fixed_features_kept_between_calls_follow_changes(backend):
    """Features without a gradient (a structure metamer's) keep their first-stage products between
    calls: each call still equals the reference for new edge weights, for the same tensor changed in
    place and for a new tensor."""
    graph = awkward_graph(num_nodes=30, num_features=7, seed=3)
    for name, model, layer, sub, joint, target, fast in _engine_cases(graph, backend):
        ref = ReferenceEngine(model, layer, sub, target, joint)
        x, generator = sub.x.clone(), torch.Generator().manual_seed(3)
        for change in ("weights", "in place", "new tensor"):
            if change == "in place":
                x.mul_(-0.5)
            elif change == "new tensor":
                x = x + 1.0
            weight = torch.rand(sub.edge_index.shape[1], generator=generator)
            with torch.no_grad():
                got, want = fast.losses(x, sub.edge_index, weight), ref.losses(x, sub.edge_index, weight)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} {layer} {change}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_binary_rows_input_matches_dense(backend):
    """Binary features given by their ones (the fused feature path) give the dense input's
    losses and free-row gradients: with the frozen boundary ring counted as zero (exact while the
    edges are fixed) and with its ones included. A residual matrix joins the products by ones
    (one gather over [weight | root weight | residual]); an identity residual reads x densely."""
    graph = awkward_graph(num_nodes=30, num_features=7, seed=2)
    graph.x = (graph.x > graph.x.median()).float()
    for name, model, layer, sub, joint, target, fast in _engine_cases(graph, backend):
        weight = torch.rand(sub.edge_index.shape[1], generator=torch.Generator().manual_seed(2))
        want_loss, want_grad, _ = _loss_and_grads(fast, sub, weight)
        for include_frozen in (False, True):
            x = _binary_rows(sub, include_frozen)
            losses = fast.losses(x, sub.edge_index, weight)
            (losses * torch.arange(1, losses.numel() + 1)).sum().backward()
            what = f"{name} {layer} frozen={include_frozen}"
            torch.testing.assert_close(losses.detach(), want_loss, rtol=1e-5, atol=1e-6, msg=what)
            torch.testing.assert_close(x.grad, want_grad[sub.free], rtol=1e-4, atol=1e-5, msg=what)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_swap_search_curvature_by_ones_matches_dense(backend):
    """The swap search's Gauss-Newton diagonal (sum over output coordinates of squared
    Jacobian entries) from the binary features' ones, through the rows that reach the targets,
    equals the one from dense features and autograd, for every lowered model and layer."""
    from fastmetamer.metamers.moves import FeatureMoves

    graph = awkward_graph(num_nodes=30, num_features=7, seed=3)
    graph.x = (graph.x > graph.x.median()).float()
    for name, model, layer, sub, joint, target, fast in _engine_cases(graph, backend):
        if joint:  # one loss over many targets: no per-target curvature
            continue
        state = sub.x[sub.free] > 0.5
        curvature = [FeatureMoves(fast, sub, sub.edge_index, None, per_row=False, by_ones=by_ones,
                                  shared_loss=False, copyable=False).curvature(state) for by_ones in (True, False)]
        assert curvature[1].abs().sum() > 0, name
        torch.testing.assert_close(curvature[0], curvature[1], rtol=1e-4, atol=1e-6, msg=f"{name} {layer}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_swap_search_subset_of_problems_equals_their_part_of_the_batch(backend):
    """The swap search narrowed to some problems (their own graph and engine) gives their losses
    and gradients in the full batch, for every lowered model and layer."""
    from fastmetamer.metamers.moves import FeatureMoves

    graph = awkward_graph(num_nodes=30, num_features=7, seed=4)
    graph.x = (graph.x > graph.x.median()).float()
    ids = torch.tensor([0, 2])
    for name, model, layer, sub, joint, target, fast in _engine_cases(graph, backend):
        if joint:
            continue
        moves = FeatureMoves(fast, sub, sub.edge_index, None, per_row=False, by_ones=True, shared_loss=False,
                             copyable=True)
        part = moves.subset(ids)
        state = sub.x[sub.free] > 0.5
        rows = torch.isin(moves.row_component, ids)
        what = f"{name} {layer}"
        torch.testing.assert_close(part.losses(state[rows]), moves.losses(state)[ids], rtol=1e-5, atol=1e-7, msg=what)
        torch.testing.assert_close(part.gradient(state[rows]), moves.gradient(state)[rows], rtol=1e-5, atol=1e-7,
                                   msg=what)


def test_unsupported_models_are_named_and_fall_back(synthetic):
    gat = GAT(synthetic.num_features, 8, 2, 5, residual=True).eval()  # PyG adds it before the activation
    with pytest.raises(Unsupported, match="GATConv with .*residual"):
        lower(gat, "convs.1")
    if dispatch.resolve("auto") == "reference":
        pytest.skip("no compiled backend here: auto is the reference engine")
    sub = whole_graph(synthetic.x, synthetic.edge_index, None)
    with pytest.warns(UserWarning, match="GATConv.*reference engine"):
        engine = make_engine("auto", gat, "convs.1", sub, torch.zeros(1, 5), True)
    assert isinstance(engine, ReferenceEngine)


def _pooled_models(d: int) -> dict:
    torch.manual_seed(1)
    return {f"{arch}-{pool}": fm.models.build_model(arch, d, 3, hidden=8, pool=pool, **kwargs)
            for arch, pool, kwargs in [("gcn", "add", {}), ("graphsage", "mean", {"act": "elu"}),
                                       ("gin", "max", {}), ("gat", "add", {"heads": 2}), ("gatv2", "mean", {}),
                                       ("sgc", "add", {"K": 2}), ("appnp", "max", {"K": 3}),
                                       ("gcn", "mean", {"residual": True, "act": "tanh"})]}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_pooled_readouts_match_reference(backend):
    """Graph-level programs (every stage, then sum / mean / max pooling per graph) against the
    reference engine: loss, outputs, feature and edge-weight gradients, for a batch of three
    graphs (one a single node without edges) and one graph alone."""
    first, last = awkward_graph(num_nodes=12, num_features=6, seed=0), awkward_graph(num_nodes=15, num_features=6, seed=2)
    x = torch.cat([first.x, torch.randn(1, 6, generator=torch.Generator().manual_seed(1)), last.x])
    edge_index = torch.cat([first.edge_index, last.edge_index + 13], dim=1)  # node 12 alone, no edges
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor([12, 1, 15]))
    parts = [first]
    for name, model in _pooled_models(6).items():
        model.eval()
        assert lower(model, "readout").pool == model.readout.mode
        for sub in (whole_graph(x, edge_index, None, batch=batch), whole_graph(parts[0].x, parts[0].edge_index, None)):
            with torch.no_grad():
                target = layer_output(model, "readout", sub.x, sub.edge_index, batch=sub.pool_batch) + 0.1
            joint = sub.num_components == 1
            sub.center = torch.arange(target.shape[0])  # one target per graph, as generate sets it
            weight = torch.rand(sub.edge_index.shape[1], generator=torch.Generator().manual_seed(3))
            engines = [FastEngine(lower(model, "readout"), backend, model, sub, target, joint),
                       ReferenceEngine(model, "readout", sub, target, joint)]
            for got, want, what in zip(*(_loss_and_grads(e, sub, weight) for e in engines),
                                       ("loss", "grad x", "grad edge weight")):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} {what}")
            outs = [e.target_outputs(sub.x, sub.edge_index, weight) for e in engines]
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6, msg=name)


def test_auto_prefers_compiled_cpu_backend():
    expected = "cpu" if dispatch.is_available("cpu") else "reference"
    assert dispatch.resolve("auto", "cpu") == expected
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.resolve("tpu")


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "reference"])
def test_fast_generate_follows_reference_trajectory(synthetic, pyg_gcn, backend):
    """Same seed, same steps: the fused path (kernels + fused binary update) tracks the
    reference engine's loss history and ends at an equally good metamer."""
    nodes = synthetic.test_mask.nonzero().flatten()[:3].tolist()
    ref = fm.generate(pyg_gcn, synthetic, nodes, steps=30, backend="reference", progress=False)
    fast = fm.generate(pyg_gcn, synthetic, nodes, steps=30, backend=backend, progress=False)
    assert fast.settings["backend"] == backend
    torch.testing.assert_close(fast.history[:10], ref.history[:10], rtol=1e-3, atol=1e-6)
    long_ref = fm.generate(pyg_gcn, synthetic, nodes, steps=300, backend="reference", progress=False)
    long_fast = fm.generate(pyg_gcn, synthetic, nodes, steps=300, backend=backend, progress=False)
    assert (long_fast.loss < 10 * long_ref.loss + 1e-4).all()
    assert set(long_fast.graph.x.unique().tolist()) <= {0.0, 1.0}
    free = long_fast.graph.free_mask
    assert long_fast.graph.x[free].sum() == long_fast.reference.x[free].sum()


def test_structure_steps_reuse_one_sparsity_pattern(monkeypatch):
    """Between resamples a structure metamer's edge list is one tensor whose weights change, so
    the fast engine builds its patterns once, not once per step."""
    from fastmetamer.engines import csr

    graph = awkward_graph(num_nodes=30, num_features=6, seed=2)
    torch.manual_seed(0)
    model = fm.models.GCN(6, 3, hidden=8, depth=2).eval()
    built = []
    real = csr.Pattern.from_coo.__func__
    monkeypatch.setattr(csr.Pattern, "from_coo", classmethod(lambda cls, *a, **k: built.append(1) or real(cls, *a, **k)))
    counts = []
    fm.generate(model, graph, 4, steps=1, refine_steps=0, progress=False, scores=False)  # caches the whole-graph pass
    for steps in (10, 40):
        built.clear()
        res = fm.generate(model, graph, 4, kind="structure", steps=steps, refine_steps=0, progress=False,
                          scores=False, backend="cpu")
        assert res.settings["backend"] == "cpu"
        counts.append(len(built))
    assert counts[0] == counts[1]  # independent of the number of steps


@pytest.mark.parametrize("kind", ["features", "structure"])
@pytest.mark.parametrize("arch", ["sgc", "appnp", "gat", "gatv2"])
def test_propagation_models_run_on_the_fast_engine(synthetic, arch, kind):
    """A zoo SGC (K = 3 hops of the GCN operator), APPNP (its MLP, then K = 4 teleporting
    propagation steps), GAT (two heads) and GATv2 lower: no fallback warning, the fast engine's
    trajectory follows the reference engine's, and the metamer's loss falls."""
    import warnings

    if not dispatch.is_available("cpu"):
        pytest.skip("cpu backend not built")
    torch.manual_seed(0)
    options = {"sgc": {"K": 3}, "appnp": {"K": 4}, "gat": {"heads": 2}, "gatv2": {}}[arch]
    model = fm.models.build_model(arch, synthetic.num_features, int(synthetic.y.max()) + 1, hidden=16, **options)
    fm.models.train(model, synthetic, epochs=30, seed=0)
    nodes = synthetic.test_mask.nonzero().flatten()[:3].tolist()
    options = dict(kind=kind, steps=40, refine_steps=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback to the reference engine warns
        fast = fm.generate(model, synthetic, nodes, backend="cpu", **options)
    ref = fm.generate(model, synthetic, nodes, backend="reference", **options)
    torch.testing.assert_close(fast.history[:10], ref.history[:10], rtol=1e-3, atol=1e-6)
    assert bool((fast.history[-1] < fast.history[0]).all())
