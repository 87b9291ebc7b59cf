"""Tests for fastmetamer.models: zoo, exact edge-weight semantics, training, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_geometric.data import Batch, Data
from torch_geometric.nn import MessagePassing

from fastmetamer.models import (
    ACTIVATIONS,
    MODEL_NAMES,
    GAT,
    GCN,
    MLP,
    build_model,
    load_checkpoint,
    save_checkpoint,
    train,
)
from fastmetamer.models.convs import (
    WeightedGATConv,
    WeightedGATv2Conv,
    WeightedGCNConv,
    WeightedGINConv,
    WeightedSAGEConv,
)

MP_MODELS = [name for name in MODEL_NAMES if name != "mlp"]
EXTRA = {"gat": {"heads": 2}, "gatv2": {"heads": 2}, "sgc": {"K": 3}, "appnp": {"K": 4}}
F_IN, N_CLASSES = 5, 3


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny graphs: one intra-op thread is faster and immune to oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name: str, **kwargs) -> torch.nn.Module:
    """Small eval-mode model of the given kind."""
    torch.manual_seed(0)
    options = {"hidden": 8, **EXTRA.get(name, {}), **kwargs}
    if name == "sgc":
        options.pop("depth", None)
    return build_model(name, F_IN, N_CLASSES, **options).eval()


def messy_graph(seed: int = 0, n: int = 10, e: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, F_IN] and edges with self loops, duplicates and 2 isolated nodes."""
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, n - 2, (2, e), generator=g)
    extra = torch.tensor([[0, 1, 3, 3], [0, 1, 4, 4]])  # two self loops, one duplicated edge
    return torch.randn(n, F_IN, generator=g), torch.cat([edge_index, extra], dim=1)


@st.composite
def weighted_graphs(draw):
    """A messy graph plus non-negative edge weights, some of them exactly 0."""
    n = draw(st.integers(5, 12))
    e = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**16))
    x, edge_index = messy_graph(seed, n, e)
    weights = draw(st.lists(st.sampled_from([0.0, 0.0, 1.0, 0.3, 2.5]), min_size=edge_index.size(1),
                            max_size=edge_index.size(1)))
    return x, edge_index, torch.tensor(weights)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes(name, act):
    x, edge_index = messy_graph()
    model = make(name, act=act)
    assert model(x, edge_index).shape == (x.size(0), N_CLASSES)
    pooled = make(name, act=act, pool="max")
    batch = torch.tensor([0] * 4 + [1] * 6)
    assert pooled(x, edge_index, batch=batch).shape == (2, N_CLASSES)
    assert pooled(x, edge_index).shape == (1, N_CLASSES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_edges_and_single_node(name):
    model = make(name)
    for n in (1, 4):
        out = model(torch.randn(n, F_IN), torch.empty(2, 0, dtype=torch.long))
        assert out.shape == (n, N_CLASSES) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_metamer_layers_resolve_and_last_layer_is_logits(name):
    x, edge_index = messy_graph()
    model = make(name, depth=3)
    modules = dict(model.named_modules())
    outputs = {}
    for layer in model.metamer_layers:
        modules[layer].register_forward_hook(lambda m, i, o, layer=layer: outputs.__setitem__(layer, o))
    logits = model(x, edge_index)
    assert set(outputs) == set(model.metamer_layers)
    assert torch.equal(outputs[model.metamer_layers[-1]], logits)
    assert all(hasattr(modules[layer], "conv") for layer in model.metamer_layers)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pooled_model_readout_layer_and_batch_consistency(name):
    model = make(name, pool="mean")
    assert model.metamer_layers[-1] == "readout"
    x1, e1 = messy_graph(1, 6, 8)
    x2, e2 = messy_graph(2, 7, 9)
    batch = Batch.from_data_list([Data(x=x1, edge_index=e1), Data(x=x2, edge_index=e2)])
    together = model(batch.x, batch.edge_index, batch=batch.batch)
    separate = torch.cat([model(x1, e1), model(x2, e2)])
    assert torch.allclose(together, separate, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "hops"),
    [("gcn", 3), ("graphsage", 3), ("gin", 3), ("gat", 3), ("gatv2", 3), ("sgc", 3), ("appnp", 4), ("mlp", 0)],
)
def test_propagate_called_once_per_hop(name, hops):
    x, edge_index = messy_graph()
    model = make(name, depth=3)
    calls = []
    for module in model.modules():
        if isinstance(module, MessagePassing):
            module.register_propagate_forward_hook(lambda *args: calls.append(1))
    model(x, edge_index)
    assert len(calls) == hops


def test_residual_blocks():
    x, edge_index = messy_graph()
    model = make("gcn", residual=True, hidden=F_IN, depth=2, act="tanh")
    first, last = model.layers
    assert isinstance(first.res, torch.nn.Identity)
    assert isinstance(last.res, torch.nn.Linear) and last.act is None
    h0 = first(x, edge_index)
    assert torch.allclose(h0, torch.tanh(first.conv(x, edge_index)) + x, atol=1e-6)
    assert torch.allclose(model(x, edge_index), last.conv(h0, edge_index) + last.res(h0), atol=1e-6)
    assert all(block.res is None for block in make("gcn").layers)


# --------------------------------------------------------------------------- edge weights


@pytest.mark.parametrize("pool", [None, "add"])
@pytest.mark.parametrize("name", MP_MODELS)
@settings(max_examples=12, deadline=None)
@given(graph=weighted_graphs(), residual=st.booleans())
def test_zero_weight_edges_behave_as_removed(name, pool, graph, residual):
    x, edge_index, weight = graph
    model = make(name, pool=pool, residual=residual, depth=2)
    keep = weight > 0
    with_zeros = model(x, edge_index, weight)
    removed = model(x, edge_index[:, keep], weight[keep])
    assert torch.allclose(with_zeros, removed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
@settings(max_examples=8, deadline=None)
@given(graph=weighted_graphs())
def test_unit_weights_equal_no_weights(name, graph):
    x, edge_index, _ = graph
    model = make(name)
    ones = torch.ones(edge_index.size(1))
    assert torch.allclose(model(x, edge_index, ones), model(x, edge_index), atol=1e-6)


@pytest.mark.parametrize("name", MP_MODELS)
def test_edge_weight_gradient(name):
    x, edge_index = messy_graph()
    weight = torch.ones(edge_index.size(1))
    weight[::3] = 0.0
    weight.requires_grad_(True)
    model = make(name, act="elu")
    probe = torch.randn(x.size(0), N_CLASSES, generator=torch.Generator().manual_seed(1))
    (model(x, edge_index, weight) * probe).sum().backward()
    assert torch.isfinite(weight.grad).all()
    assert weight.grad.abs().sum() > 0
    assert weight.grad[::3].abs().sum() > 0  # adding an absent edge has an effect


def test_mlp_ignores_edges():
    x, edge_index = messy_graph()
    model = make("mlp")
    empty = torch.empty(2, 0, dtype=torch.long)
    assert torch.equal(model(x, edge_index, torch.rand(edge_index.size(1))), model(x, empty))


# --------------------------------------------------------------------------- dense oracles (float64)


def dense_adjacency(edge_index, weight, n, self_loops):
    """A[i, j] = total weight of edges j -> i (duplicates add), plus I if requested."""
    adj = torch.zeros(n, n, dtype=torch.float64).index_put_((edge_index[1], edge_index[0]), weight, accumulate=True)
    return adj + torch.eye(n, dtype=torch.float64) if self_loops else adj


@pytest.fixture
def weighted():
    x, edge_index = messy_graph(3)
    weight = torch.rand(edge_index.size(1), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weight[::4] = 0.0
    return x.double(), edge_index, weight


def test_gcn_conv_matches_dense(weighted):
    x, edge_index, weight = weighted
    conv = WeightedGCNConv(F_IN, 4).double()
    adj = dense_adjacency(edge_index, weight, x.size(0), self_loops=True)
    d = adj.sum(1).rsqrt()
    expected = d[:, None] * adj * d[None, :] @ conv.lin(x) + conv.bias
    assert torch.allclose(conv(x, edge_index, weight), expected, atol=1e-10)


def test_sage_conv_matches_dense(weighted):
    x, edge_index, weight = weighted
    conv = WeightedSAGEConv(F_IN, 4).double()
    adj = dense_adjacency(edge_index, weight, x.size(0), self_loops=False)
    deg = adj.sum(1, keepdim=True)
    mean = torch.where(deg > 0, adj @ x / deg.clamp_min(1e-300), torch.zeros_like(x))
    expected = conv.lin_l(mean) + conv.lin_r(x)
    assert torch.allclose(conv(x, edge_index, weight), expected, atol=1e-10)


def test_gin_conv_matches_dense(weighted):
    x, edge_index, weight = weighted
    conv = WeightedGINConv(torch.nn.Linear(F_IN, 4).double(), eps=0.25)
    adj = dense_adjacency(edge_index, weight, x.size(0), self_loops=False)
    assert torch.allclose(conv(x, edge_index, weight), conv.mlp(1.25 * x + adj @ x), atol=1e-10)


@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("version", [1, 2])
def test_attention_conv_matches_dense(weighted, version, concat):
    x, edge_index, weight = weighted
    n, heads, c = x.size(0), 3, 4
    adj = dense_adjacency(edge_index, weight, n, self_loops=True)
    if version == 1:
        conv = WeightedGATConv(F_IN, c, heads, concat).double()
        h = conv.lin(x).view(n, heads, c)
        src, dst = (h * conv.att_src).sum(-1), (h * conv.att_dst).sum(-1)
        logits = F.leaky_relu(dst[:, None, :] + src[None, :, :], 0.2)  # [i, j, head]
        values = h
    else:
        conv = WeightedGATv2Conv(F_IN, c, heads, concat).double()
        xl, xr = conv.lin_l(x).view(n, heads, c), conv.lin_r(x).view(n, heads, c)
        logits = (F.leaky_relu(xr[:, None] + xl[None, :], 0.2) * conv.att).sum(-1)
        values = xl
    scores = adj[:, :, None] * logits.exp()
    alpha = scores / scores.sum(1, keepdim=True)
    out = torch.einsum("ijh,jhc->ihc", alpha, values)
    expected = (out.flatten(1) if concat else out.mean(1)) + conv.bias
    assert torch.allclose(conv(x, edge_index, weight), expected, atol=1e-10)


# --------------------------------------------------------------------------- config, checkpoints, errors


@pytest.mark.parametrize("pool", [None, "mean"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_checkpoint_round_trip(name, pool, tmp_path):
    x, edge_index = messy_graph()
    model = make(name, pool=pool, act="gelu", residual=True)
    path = tmp_path / "model.pt"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert not loaded.training
    assert torch.equal(loaded(x, edge_index), model(x, edge_index))


def test_build_model_from_config_and_case():
    model = build_model("GAT", 4, 2, heads=4, hidden=16, depth=3, act="leaky_relu")
    assert isinstance(model, GAT) and model.config["name"] == "gat"
    rebuilt = build_model(**model.config)
    assert rebuilt.config == model.config
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: build_model("gcnn", 4, 2), ValueError, "allowed"),
        (lambda: build_model(3, 4, 2), TypeError, "str"),
        (lambda: GCN(4, 2, act="swish"), ValueError, "relu"),
        (lambda: GCN(4, 2, pool="sum"), ValueError, "mean"),
        (lambda: GCN(4, 2, depth=0), ValueError, "depth"),
        (lambda: GCN(4, 2, hidden=2.5), TypeError, "hidden"),
        (lambda: GCN(4, 2, dropout=1.0), ValueError, "dropout"),
        (lambda: GCN(4, 2, heads=2), TypeError, "heads"),
        (lambda: GAT(4, 2, hidden=10, heads=3), ValueError, "divisible"),
        (lambda: build_model("sgc", 4, 2, depth=2), ValueError, "K"),
        (lambda: build_model("appnp", 4, 2, alpha=0.0), ValueError, "alpha"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_graph_inputs():
    model = make("gcn")
    x, edge_index = messy_graph()
    with pytest.raises(ValueError, match="edge_index"):
        model(x, edge_index.t())
    with pytest.raises(TypeError, match="int64"):
        model(x, edge_index.int())
    with pytest.raises(ValueError, match="edge_weight"):
        model(x, edge_index, torch.ones(3))
    with pytest.raises(ValueError, match="ids"):
        model(x[:4], edge_index)


# --------------------------------------------------------------------------- training


def planted_partition(seed=0, blocks=4, size=40, p_in=0.2, p_out=0.01, signal=0.6):
    """Stochastic block model with weakly informative features and random splits."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(blocks).repeat_interleave(size)
    n = y.numel()
    prob = torch.where(y[:, None] == y[None, :], p_in, p_out)
    upper = torch.triu(torch.rand(n, n, generator=g) < prob, diagonal=1)
    edge_index = (upper | upper.t()).nonzero().t()
    x = torch.randn(n, 16, generator=g)
    x[torch.arange(n), y] += signal
    perm = torch.randperm(n, generator=g)
    masks = [torch.zeros(n, dtype=torch.bool).index_fill_(0, idx, True) for idx in perm.split([n // 2, n // 4, n // 4])]
    return Data(x=x, edge_index=edge_index, y=y, train_mask=masks[0], val_mask=masks[1], test_mask=masks[2])


@pytest.fixture(scope="module")
def sbm():
    return planted_partition()


def test_training_uses_graph_structure(sbm):
    torch.manual_seed(0)
    gcn = train(GCN(16, 4, hidden=16), sbm, epochs=60, patience=20)
    torch.manual_seed(0)
    mlp = train(MLP(16, 4, hidden=16), sbm, epochs=60, patience=20)
    assert gcn.test_acc >= 0.9  # chance is 0.25
    assert gcn.test_acc >= mlp.test_acc + 0.3  # features alone are weak; edges carry the signal
    assert not gcn.model.training
    assert len(gcn.history["val_acc"]) == len(gcn.history["train_loss"]) >= gcn.best_epoch + 1


def test_training_is_deterministic(sbm):
    results = []
    for _ in range(2):
        torch.manual_seed(1)
        results.append(train(GCN(16, 4, hidden=8), sbm, epochs=10, seed=3))
    for a, b in zip(results[0].model.state_dict().values(), results[1].model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_adversarial_training_changes_weights(sbm, norm):
    def run(adversarial):
        torch.manual_seed(2)
        return train(GCN(16, 4, hidden=8), sbm, epochs=15, adversarial=adversarial)

    clean = run(None)
    adv = run(dict(norm=norm, eps=0.3, steps=3))
    assert adv.test_acc > 0.5
    diffs = [(a - b).abs().max() for a, b in zip(clean.model.state_dict().values(), adv.model.state_dict().values())]
    assert max(diffs) > 1e-3
    again = run(dict(norm=norm, eps=0.3, steps=3))
    assert all(torch.equal(a, b) for a, b in zip(adv.model.state_dict().values(), again.model.state_dict().values()))


def ring_graphs(count=80, seed=0):
    """Class 0: rings; class 1: rings with chords. Constant features."""
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for i in range(count):
        n = int(torch.randint(6, 12, (1,), generator=g))
        src = torch.arange(n)
        edges = [torch.stack([src, (src + 1) % n])]
        if i % 2:
            edges.append(torch.stack([src, (src + n // 2) % n]))
        edge_index = torch.cat(edges, dim=1)
        edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
        graphs.append(Data(x=torch.ones(n, 1), edge_index=edge_index, y=torch.tensor([i % 2])))
    return graphs


def test_graph_classification_training():
    torch.manual_seed(0)
    result = train(build_model("gin", 1, 2, hidden=16, pool="add", dropout=0.0), ring_graphs(), epochs=25,
                   batch_size=32)
    assert result.test_acc >= 0.85 and result.train_acc >= 0.85


def test_training_argument_errors(sbm):
    no_masks = Data(x=sbm.x, edge_index=sbm.edge_index, y=sbm.y)
    with pytest.raises(ValueError, match="train_mask"):
        train(make("gcn"), no_masks)
    with pytest.raises(ValueError, match="pool"):
        train(GCN(16, 4), ring_graphs(6))
    with pytest.raises(ValueError, match="list of graphs"):
        train(GCN(16, 4, pool="mean"), sbm)
    with pytest.raises(ValueError, match="norm"):
        train(GCN(16, 4), sbm, adversarial=dict(norm="l1", eps=0.1))
    with pytest.raises(ValueError, match="allowed"):
        train(GCN(16, 4), sbm, adversarial=dict(eps=0.1, radius=2))
    with pytest.raises(ValueError, match="epochs"):
        train(GCN(16, 4), sbm, epochs=0)
    with pytest.raises(TypeError, match="Data"):
        train(GCN(16, 4), sbm.x)
