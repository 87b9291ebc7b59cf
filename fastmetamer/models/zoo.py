"""The fastmetamer model zoo: GCN, GraphSAGE, GIN, GAT, GATv2, SGC, APPNP and MLP.

All models share one layout, which the metamer engines rely on:

* ``model.layers`` is an ``nn.ModuleList`` of :class:`Block` modules. Block
  ``i`` computes ``dropout(act(conv(h)) + res(h))`` and its output is layer
  ``i``'s node representation ``[N, d_i]``. Each block keeps its layer as
  ``block.conv``.
* Node classification (``pool=None``): the last block has no activation and no
  dropout; its output is the logits ``[N, out_channels]``.
* Graph classification (``pool`` in ``"mean"``, ``"add"``, ``"max"``): every
  block has an activation, then ``model.readout`` pools to ``[B, hidden]`` and
  ``model.head`` (Linear) gives logits ``[B, out_channels]``.
* ``model.metamer_layers`` lists the names of the modules whose outputs are
  the per-layer representations (``"layers.0"``, ..., and ``"readout"``).
* ``model.config`` is a plain dict such that ``build_model(**model.config)``
  rebuilds the architecture.

Every model is called as ``model(x, edge_index, edge_weight=None, batch=None)``
with ``x`` ``[N, F]``, ``edge_index`` ``[2, E]`` (int64), ``edge_weight`` ``[E]``
(non-negative; 0 == edge absent, 1 == edge present) and ``batch`` ``[N]`` (graph
id of each node; only used when ``pool`` is set, None means one graph).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing, global_add_pool, global_max_pool, global_mean_pool

from .convs import (
    APPNPPropagation,
    WeightedGATConv,
    WeightedGATv2Conv,
    WeightedGCNConv,
    WeightedGINConv,
    WeightedSAGEConv,
    WeightedSGConv,
)

#: Activation name -> module class.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}

_POOLS = {"mean": global_mean_pool, "add": global_add_pool, "max": global_max_pool}


def make_activation(act: str) -> nn.Module:
    """Return a fresh activation module for the name ``act`` (see :data:`ACTIVATIONS`)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; allowed: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]()


def _check_int(name: str, value: Any, minimum: int) -> None:
    """Raise TypeError/ValueError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_edges(x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> None:
    """Validate shapes, dtypes and node ids of the graph inputs."""
    for name, value in [("x", x), ("edge_index", edge_index), ("edge_weight", edge_weight)]:
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape [num_nodes, num_features], got {tuple(x.shape)}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, num_edges], got {tuple(edge_index.shape)}")
    if edge_index.dtype != torch.long:
        raise TypeError(f"edge_index must be int64, got {edge_index.dtype}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= x.size(0)):
        raise ValueError(f"edge_index ids must lie in [0, {x.size(0)}) (num_nodes = x.size(0))")
    if edge_weight is not None and edge_weight.shape != (edge_index.size(1),):
        raise ValueError(
            f"edge_weight must have shape [num_edges]=[{edge_index.size(1)}], got {tuple(edge_weight.shape)}"
        )


def _check_heads(hidden: Any, heads: Any) -> None:
    """Raise unless ``heads`` is a positive int dividing ``hidden``."""
    _check_int("heads", heads, 1)
    _check_int("hidden", hidden, 1)
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")


class Block(nn.Module):
    """One layer: ``dropout(act(conv(x)) + res(x))``.

    Args:
        conv: a MessagePassing layer called as ``conv(x, edge_index, edge_weight)``
            or any other module called as ``conv(x)`` (e.g. ``nn.Linear``).
        act: activation module, or None for none (logits).
        res: residual map (``nn.Identity`` or a bias-free ``nn.Linear``), or None.
        dropout: dropout probability applied to the block output.
    """

    def __init__(self, conv: nn.Module, act: nn.Module | None, res: nn.Module | None, dropout: float) -> None:
        super().__init__()
        self.conv = conv
        self.act = act
        self.res = res
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Map ``x`` ``[N, d_in]`` to ``[N, d_out]``."""
        if isinstance(self.conv, MessagePassing):
            h = self.conv(x, edge_index, edge_weight)
        else:
            h = self.conv(x)
        if self.act is not None:
            h = self.act(h)
        if self.res is not None:
            h = h + self.res(x)
        return self.dropout(h)


class Readout(nn.Module):
    """Global pooling ``[N, d] -> [B, d]`` with ``mode`` in ``"mean"``, ``"add"``, ``"max"``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in _POOLS:
            raise ValueError(f"unknown pool {mode!r}; allowed: None or one of {sorted(_POOLS)}")
        self.mode = mode

    def forward(self, h: Tensor, batch: Tensor | None = None) -> Tensor:
        """Pool node states ``h`` ``[N, d]`` per graph id in ``batch`` ``[N]`` (None: one graph)."""
        return _POOLS[self.mode](h, batch)

    def extra_repr(self) -> str:
        """Show the pooling mode in ``repr``."""
        return f"mode={self.mode!r}"


class ZooModel(nn.Module):
    """Base class of the zoo: builds blocks, readout and head; runs the forward pass.

    Subclasses set ``name`` and implement :meth:`make_conv`; models with a
    different block structure override :meth:`build_blocks`.

    Args:
        in_channels: node feature size ``F``.
        out_channels: number of classes.
        hidden: hidden width.
        depth: number of blocks.
        act: activation name, one of :data:`ACTIVATIONS`.
        residual: add a residual connection to every block.
        dropout: dropout probability after every hidden block.
        pool: None (node classification) or ``"mean"``/``"add"``/``"max"``.
        _options: model-specific options of subclasses, stored in ``config``.
    """

    name = ""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 64,
        depth: int = 2,
        act: str = "relu",
        residual: bool = False,
        dropout: float = 0.5,
        pool: str | None = None,
        *,
        _options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for arg, value, minimum in [("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                    ("hidden", hidden, 1), ("depth", depth, 1)]:
            _check_int(arg, value, minimum)
        make_activation(act)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = dict(name=self.name, in_channels=in_channels, out_channels=out_channels, hidden=hidden,
                           depth=depth, act=act, residual=bool(residual), dropout=float(dropout), pool=pool,
                           **(_options or {}))
        self.layers = nn.ModuleList(self.build_blocks())
        self.readout = Readout(pool) if pool is not None else None
        self.head = nn.Linear(hidden, out_channels) if pool is not None else None
        self.metamer_layers = [f"layers.{i}" for i in range(len(self.layers))]
        if pool is not None:
            self.metamer_layers.append("readout")

    @property
    def pooled(self) -> bool:
        """True for graph-classification models (``pool`` is set)."""
        return self.config["pool"] is not None

    def make_conv(self, in_dim: int, out_dim: int, logits: bool) -> nn.Module:
        """Return the layer of one block mapping ``[N, in_dim]`` to ``[N, out_dim]``.

        ``logits`` is True for the final block of a node-classification model.
        """
        raise NotImplementedError

    def block_dims(self, count: int) -> list[tuple[int, int]]:
        """Input/output sizes of ``count`` chained blocks, from features to output."""
        last = self.config["hidden"] if self.pooled else self.config["out_channels"]
        dims = [self.config["in_channels"]] + [self.config["hidden"]] * (count - 1) + [last]
        return list(zip(dims[:-1], dims[1:]))

    def make_block(self, conv: nn.Module, in_dim: int, out_dim: int, final: bool) -> Block:
        """Wrap ``conv`` with activation, residual and dropout as configured."""
        cfg = self.config
        logits = final and not self.pooled
        act = None if logits else make_activation(cfg["act"])
        res = None
        if cfg["residual"]:
            res = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)
        return Block(conv, act, res, 0.0 if logits else cfg["dropout"])

    def build_blocks(self) -> list[Block]:
        """Build ``depth`` blocks, each around :meth:`make_conv`."""
        dims = self.block_dims(self.config["depth"])
        blocks = []
        for i, (d_in, d_out) in enumerate(dims):
            final = i == len(dims) - 1
            conv = self.make_conv(d_in, d_out, final and not self.pooled)
            blocks.append(self.make_block(conv, d_in, d_out, final))
        return blocks

    def forward(
        self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None, batch: Tensor | None = None
    ) -> Tensor:
        """Return logits: ``[N, out_channels]`` (node level) or ``[B, out_channels]`` (pooled).

        Args:
            x: node features ``[N, F]``.
            edge_index: ``[2, E]`` int64, row 0 source, row 1 target.
            edge_weight: optional ``[E]`` non-negative edge weights.
            batch: optional ``[N]`` graph id per node, used only when pooling.
        """
        _check_edges(x, edge_index, edge_weight)
        h = x
        for block in self.layers:
            h = block(h, edge_index, edge_weight)
        if self.readout is None:
            return h
        return self.head(self.readout(h, batch))


class GCN(ZooModel):
    """Graph convolutional network (Kipf & Welling, 2017); see :class:`ZooModel` for args."""

    name = "gcn"

    def make_conv(self, in_dim: int, out_dim: int, logits: bool) -> nn.Module:
        """GCN layer ``[N, in_dim] -> [N, out_dim]``."""
        return WeightedGCNConv(in_dim, out_dim)


class GraphSAGE(ZooModel):
    """GraphSAGE with weighted-mean aggregation (Hamilton et al., 2017); see :class:`ZooModel`."""

    name = "graphsage"

    def make_conv(self, in_dim: int, out_dim: int, logits: bool) -> nn.Module:
        """SAGE layer ``[N, in_dim] -> [N, out_dim]``."""
        return WeightedSAGEConv(in_dim, out_dim)


class GIN(ZooModel):
    """Graph isomorphism network (Xu et al., 2019); see :class:`ZooModel` for args.

    Each layer's MLP is ``Linear(in, hidden) -> act -> Linear(hidden, out)``.

    Args:
        eps: initial ``eps`` of every layer.
        train_eps: learn ``eps``.
    """

    name = "gin"

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64, depth: int = 2, act: str = "relu",
                 residual: bool = False, dropout: float = 0.5, pool: str | None = None, eps: float = 0.0,
                 train_eps: bool = False) -> None:
        super().__init__(in_channels, out_channels, hidden, depth, act, residual, dropout, pool,
                         _options=dict(eps=float(eps), train_eps=bool(train_eps)))

    def make_conv(self, in_dim: int, out_dim: int, logits: bool) -> nn.Module:
        """GIN layer ``[N, in_dim] -> [N, out_dim]``."""
        cfg = self.config
        mlp = nn.Sequential(nn.Linear(in_dim, cfg["hidden"]), make_activation(cfg["act"]),
                            nn.Linear(cfg["hidden"], out_dim))
        return WeightedGINConv(mlp, eps=cfg["eps"], train_eps=cfg["train_eps"])


class GAT(ZooModel):
    """Graph attention network (Velickovic et al., 2018); see :class:`ZooModel` for args.

    Hidden layers have ``heads`` heads of size ``hidden // heads``, concatenated;
    the logits layer averages ``heads`` heads of size ``out_channels``.

    Args:
        heads: attention heads per layer; must divide ``hidden``.
        negative_slope: LeakyReLU slope of the attention logits.
    """

    name = "gat"

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64, depth: int = 2, act: str = "relu",
                 residual: bool = False, dropout: float = 0.5, pool: str | None = None, heads: int = 1,
                 negative_slope: float = 0.2) -> None:
        _check_heads(hidden, heads)
        ZooModel.__init__(self, in_channels, out_channels, hidden, depth, act, residual, dropout, pool,
                          _options=dict(heads=heads, negative_slope=float(negative_slope)))

    def attention_conv(self, in_dim: int, out_dim: int, heads: int, concat: bool) -> nn.Module:
        """Return this model's attention layer."""
        return WeightedGATConv(in_dim, out_dim, heads, concat, self.config["negative_slope"])

    def make_conv(self, in_dim: int, out_dim: int, logits: bool) -> nn.Module:
        """Attention layer ``[N, in_dim] -> [N, out_dim]``."""
        heads = self.config["heads"]
        if logits:
            return self.attention_conv(in_dim, out_dim, heads, concat=False)
        return self.attention_conv(in_dim, out_dim // heads, heads, concat=True)


class GATv2(GAT):
    """GATv2 (Brody et al., 2022); as :class:`GAT`, plus ``share_weights``."""

    name = "gatv2"

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64, depth: int = 2, act: str = "relu",
                 residual: bool = False, dropout: float = 0.5, pool: str | None = None, heads: int = 1,
                 negative_slope: float = 0.2, share_weights: bool = False) -> None:
        _check_heads(hidden, heads)
        options = dict(heads=heads, negative_slope=float(negative_slope), share_weights=bool(share_weights))
        ZooModel.__init__(self, in_channels, out_channels, hidden, depth, act, residual, dropout, pool,
                          _options=options)

    def attention_conv(self, in_dim: int, out_dim: int, heads: int, concat: bool) -> nn.Module:
        """Return a GATv2 attention layer."""
        cfg = self.config
        return WeightedGATv2Conv(in_dim, out_dim, heads, concat, cfg["negative_slope"], cfg["share_weights"])


class SGC(ZooModel):
    """Simplified graph convolution (Wu et al., 2019): one block ``S^K X W + b``.

    ``depth`` must be 1 (use ``K`` for more hops); ``hidden`` is used only with
    ``pool`` (the width fed to the readout); see :class:`ZooModel` for the other args.

    Args:
        K: number of propagation hops.
    """

    name = "sgc"

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64, depth: int = 1, act: str = "relu",
                 residual: bool = False, dropout: float = 0.5, pool: str | None = None, K: int = 2) -> None:
        if depth != 1:
            raise ValueError(f"SGC has exactly one layer (depth=1), got depth={depth}; use K for more hops")
        _check_int("K", K, 1)
        super().__init__(in_channels, out_channels, hidden, depth, act, residual, dropout, pool, _options=dict(K=K))

    def make_conv(self, in_dim: int, out_dim: int, logits: bool) -> nn.Module:
        """SGC layer with ``K`` hops."""
        return WeightedSGConv(in_dim, out_dim, self.config["K"])


class APPNP(ZooModel):
    """APPNP (Gasteiger et al., 2019): ``depth`` Linear blocks, then a propagation block.

    The Linear blocks form an MLP (the last one without activation unless
    pooling; residuals apply to them); the final block runs ``K`` steps of
    personalised-PageRank propagation with teleport ``alpha`` (no weights).

    Args:
        K: propagation hops.
        alpha: teleport probability in (0, 1].
    """

    name = "appnp"

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64, depth: int = 2, act: str = "relu",
                 residual: bool = False, dropout: float = 0.5, pool: str | None = None, K: int = 10,
                 alpha: float = 0.1) -> None:
        _check_int("K", K, 1)
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        super().__init__(in_channels, out_channels, hidden, depth, act, residual, dropout, pool,
                         _options=dict(K=K, alpha=float(alpha)))

    def build_blocks(self) -> list[Block]:
        """``depth`` Linear blocks followed by the propagation block."""
        dims = self.block_dims(self.config["depth"])
        blocks = [self.make_block(nn.Linear(d_in, d_out), d_in, d_out, i == len(dims) - 1)
                  for i, (d_in, d_out) in enumerate(dims)]
        prop = APPNPPropagation(self.config["K"], self.config["alpha"])
        act = make_activation(self.config["act"]) if self.pooled else None
        blocks.append(Block(prop, act, None, 0.0))
        return blocks


class MLP(ZooModel):
    """Multi-layer perceptron baseline: blocks are ``nn.Linear``; edges are ignored.

    See :class:`ZooModel` for args.
    """

    name = "mlp"

    def make_conv(self, in_dim: int, out_dim: int, logits: bool) -> nn.Module:
        """Linear layer ``[N, in_dim] -> [N, out_dim]``."""
        return nn.Linear(in_dim, out_dim)


_MODELS: dict[str, type[ZooModel]] = {
    cls.name: cls for cls in (GCN, GraphSAGE, GIN, GAT, GATv2, SGC, APPNP, MLP)
}

#: Names accepted by :func:`build_model` (case-insensitive).
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def build_model(name: str, in_channels: int, out_channels: int, **kwargs: Any) -> ZooModel:
    """Build a zoo model by name; ``build_model(**model.config)`` rebuilds ``model``.

    Args:
        name: one of :data:`MODEL_NAMES` (case-insensitive).
        in_channels: node feature size.
        out_channels: number of classes.
        **kwargs: constructor options (hidden, depth, act, residual, dropout,
            pool, and model-specific ones such as ``heads``, ``K``, ``alpha``).
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {list(MODEL_NAMES)}")
    return _MODELS[key](in_channels, out_channels, **kwargs)
