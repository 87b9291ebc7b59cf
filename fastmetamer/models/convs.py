"""Message-passing layers that honour edge weights exactly.

Every layer here is a :class:`torch_geometric.nn.MessagePassing` subclass whose
``forward(x, edge_index, edge_weight=None)`` treats ``edge_weight`` so that

* an edge of weight 0 behaves exactly as if it were absent,
* an edge of weight 1 behaves exactly as an unweighted edge (``edge_weight=None``),
* the output is differentiable with respect to ``edge_weight``.

Edge weights must be non-negative. Self loops and duplicate edges in
``edge_index`` are ordinary (weighted) edges. Layers that use self loops (GCN,
SGC, APPNP, GAT, GATv2) add one unit-weight self loop per node *on top of* any
self loops already present, so that ``Â = A_w + I`` for every input. Each layer
calls ``self.propagate`` exactly once per hop of message passing, which other
parts of fastmetamer rely on to count receptive-field sizes.

Shapes: ``x`` is ``[N, F_in]``, ``edge_index`` is ``[2, E]`` (row 0 = source
``j``, row 1 = target ``i``), ``edge_weight`` is ``[E]``; outputs are
``[N, F_out]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import scatter

#: Largest exponent used in the weighted softmax; keeps ``0 * exp(.)`` finite.
_MAX_EXPONENT = 60.0


def unit_weights(edge_index: Tensor, edge_weight: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Return ``edge_weight`` (shape ``[E]``) or ones of shape ``[E]`` when it is None."""
    if edge_weight is None:
        return torch.ones(edge_index.size(1), dtype=dtype, device=edge_index.device)
    return edge_weight.to(dtype)


def add_unit_self_loops(
    edge_index: Tensor, edge_weight: Tensor, num_nodes: int
) -> tuple[Tensor, Tensor]:
    """Append one weight-1 self loop per node; returns ``([2, E+N], [E+N])``.

    Existing self loops are kept as ordinary edges (unlike PyG's
    ``add_remaining_self_loops``, which would let a zero-weight self loop
    replace the unit loop and so break "weight 0 == absent").
    """
    loops = torch.arange(num_nodes, device=edge_index.device).unsqueeze(0).repeat(2, 1)
    ones = edge_weight.new_ones(num_nodes)
    return torch.cat([edge_index, loops], dim=1), torch.cat([edge_weight, ones])


def gcn_normalize(
    edge_index: Tensor, edge_weight: Tensor | None, num_nodes: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Symmetric GCN normalisation ``D^-1/2 (A_w + I) D^-1/2`` as edge list.

    Returns the edge index with unit self loops appended (``[2, E+N]``) and the
    normalised edge weights (``[E+N]``).
    """
    weight = unit_weights(edge_index, edge_weight, dtype)
    loop_index, loop_weight = add_unit_self_loops(edge_index, weight, num_nodes)
    return gcn_norm(loop_index, loop_weight, num_nodes, add_self_loops=False, dtype=dtype)


def weighted_softmax(logits: Tensor, weight: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    """Edge-weighted softmax over the incoming edges of each target node.

    ``alpha_ij = w_ij exp(e_ij - m_i) / sum_k w_ik exp(e_ik - m_i)`` where
    ``m_i`` is the (detached) maximum logit over incoming edges of positive
    weight, so zero-weight edges cannot change any other edge's value.

    Args:
        logits: ``[E, H]`` attention logits ``e_ij`` per head.
        weight: ``[E]`` non-negative edge weights ``w_ij``.
        index: ``[E]`` target node of each edge.
        num_nodes: number of target nodes ``N``.

    Returns:
        ``[E, H]`` attention coefficients.
    """
    absent = (weight <= 0).unsqueeze(-1)
    masked = logits.detach().masked_fill(absent, float("-inf"))
    node_max = scatter(masked, index, 0, dim_size=num_nodes, reduce="max")
    node_max = torch.where(torch.isfinite(node_max), node_max, torch.zeros_like(node_max))
    shifted = (logits - node_max[index]).clamp(max=_MAX_EXPONENT)
    numer = weight.unsqueeze(-1) * shifted.exp()
    denom = scatter(numer, index, 0, dim_size=num_nodes, reduce="sum")
    return numer / (denom[index] + 1e-16)


class WeightedGCNConv(MessagePassing):
    """GCN layer ``D^-1/2 (A_w + I) D^-1/2 X W + b`` (Kipf & Welling, 2017).

    Args:
        in_channels: input feature size ``F_in``.
        out_channels: output feature size ``F_out``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(aggr="add")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Map ``x`` ``[N, F_in]`` to ``[N, F_out]``."""
        index, norm = gcn_normalize(edge_index, edge_weight, x.size(0), x.dtype)
        return self.propagate(index, x=self.lin(x), edge_weight=norm) + self.bias

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        """Scale each source feature ``[E, F]`` by its normalised weight."""
        return edge_weight.unsqueeze(-1) * x_j


class WeightedSGConv(MessagePassing):
    """Simplified graph convolution ``S^K X W + b`` with ``S`` the GCN operator.

    Calls ``propagate`` ``K`` times (one per hop).

    Args:
        in_channels: input feature size ``F_in``.
        out_channels: output feature size ``F_out``.
        K: number of propagation hops.
    """

    def __init__(self, in_channels: int, out_channels: int, K: int = 2) -> None:
        super().__init__(aggr="add")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.K = K
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Map ``x`` ``[N, F_in]`` to ``[N, F_out]``."""
        index, norm = gcn_normalize(edge_index, edge_weight, x.size(0), x.dtype)
        h = self.lin(x)
        for _ in range(self.K):
            h = self.propagate(index, x=h, edge_weight=norm)
        return h + self.bias

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        """Scale each source feature ``[E, F]`` by its normalised weight."""
        return edge_weight.unsqueeze(-1) * x_j


class APPNPPropagation(MessagePassing):
    """Personalised-PageRank propagation ``H <- (1-alpha) S H + alpha X``, ``K`` times.

    Has no parameters; output size equals input size.

    Args:
        K: number of propagation hops.
        alpha: teleport probability.
    """

    def __init__(self, K: int = 10, alpha: float = 0.1) -> None:
        super().__init__(aggr="add")
        self.K = K
        self.alpha = alpha

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Propagate ``x`` ``[N, F]``; returns ``[N, F]``."""
        index, norm = gcn_normalize(edge_index, edge_weight, x.size(0), x.dtype)
        h = x
        for _ in range(self.K):
            h = (1 - self.alpha) * self.propagate(index, x=h, edge_weight=norm) + self.alpha * x
        return h

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        """Scale each source feature ``[E, F]`` by its normalised weight."""
        return edge_weight.unsqueeze(-1) * x_j


class WeightedSAGEConv(MessagePassing):
    """GraphSAGE layer with weighted-mean aggregation and a root weight.

    ``out_i = W_l (sum_j w_ij x_j / sum_j w_ij) + b + W_r x_i``; the mean is 0
    for a node whose incoming weights sum to 0 (no neighbours).

    Args:
        in_channels: input feature size ``F_in``.
        out_channels: output feature size ``F_out``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(aggr="add")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.lin_l = nn.Linear(in_channels, out_channels, bias=True)
        self.lin_r = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Map ``x`` ``[N, F_in]`` to ``[N, F_out]``."""
        weight = unit_weights(edge_index, edge_weight, x.dtype)
        total = self.propagate(edge_index, x=x, edge_weight=weight)
        deg = scatter(weight, edge_index[1], 0, dim_size=x.size(0), reduce="sum")
        deg = torch.where(deg > 0, deg, torch.ones_like(deg))
        return self.lin_l(total / deg.unsqueeze(-1)) + self.lin_r(x)

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        """Scale each source feature ``[E, F]`` by its edge weight."""
        return edge_weight.unsqueeze(-1) * x_j


class WeightedGINConv(MessagePassing):
    """GIN layer ``mlp((1 + eps) x_i + sum_j w_ij x_j)`` (Xu et al., 2019).

    Args:
        mlp: module mapping ``[N, F_in]`` to ``[N, F_out]``.
        eps: initial value of ``eps``.
        train_eps: learn ``eps`` when True.
    """

    def __init__(self, mlp: nn.Module, eps: float = 0.0, train_eps: bool = False) -> None:
        super().__init__(aggr="add")
        self.mlp = mlp
        if train_eps:
            self.eps = nn.Parameter(torch.tensor(float(eps)))
        else:
            self.register_buffer("eps", torch.tensor(float(eps)))

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Map ``x`` ``[N, F_in]`` to ``[N, F_out]``."""
        weight = unit_weights(edge_index, edge_weight, x.dtype)
        total = self.propagate(edge_index, x=x, edge_weight=weight)
        return self.mlp((1 + self.eps) * x + total)

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        """Scale each source feature ``[E, F]`` by its edge weight."""
        return edge_weight.unsqueeze(-1) * x_j


class _AttentionConv(MessagePassing):
    """Shared head bookkeeping and weighted-softmax message of GAT and GATv2."""

    def __init__(self, in_channels: int, out_channels: int, heads: int, concat: bool, negative_slope: float) -> None:
        super().__init__(aggr="add", node_dim=0)
        self.in_channels = in_channels
        self.heads = heads
        self.out_channels = out_channels
        self.concat = concat
        self.negative_slope = negative_slope
        self.bias = nn.Parameter(torch.zeros(heads * out_channels if concat else out_channels))

    def _finish(self, out: Tensor) -> Tensor:
        """Merge heads ``[N, H, C]`` to ``[N, H*C]`` (concat) or ``[N, C]`` (mean), add bias."""
        out = out.flatten(1) if self.concat else out.mean(dim=1)
        return out + self.bias

    def _loops(self, edge_index: Tensor, edge_weight: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unit weights if needed, plus one unit self loop per node."""
        weight = unit_weights(edge_index, edge_weight, x.dtype)
        return add_unit_self_loops(edge_index, weight, x.size(0))


class WeightedGATConv(_AttentionConv):
    """GAT layer (Velickovic et al., 2018) with edge-weighted attention softmax.

    ``e_ij = LeakyReLU(a_src . W x_j + a_dst . W x_i)``, ``alpha`` from
    :func:`weighted_softmax`, ``out_i = sum_j alpha_ij W x_j`` per head.

    Args:
        in_channels: input feature size ``F_in``.
        out_channels: per-head output size ``C``.
        heads: number of heads ``H``.
        concat: concatenate heads (``[N, H*C]``) or average them (``[N, C]``).
        negative_slope: LeakyReLU slope of the attention logits.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__(in_channels, out_channels, heads, concat, negative_slope)
        self.lin = nn.Linear(in_channels, heads * out_channels, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Map ``x`` ``[N, F_in]`` to ``[N, H*C]`` or ``[N, C]``."""
        index, weight = self._loops(edge_index, edge_weight, x)
        h = self.lin(x).view(-1, self.heads, self.out_channels)
        a_src = (h * self.att_src).sum(-1)
        a_dst = (h * self.att_dst).sum(-1)
        out = self.propagate(index, x=h, a_src=a_src, a_dst=a_dst, edge_weight=weight)
        return self._finish(out)

    def message(
        self, x_j: Tensor, a_src_j: Tensor, a_dst_i: Tensor, edge_weight: Tensor, index: Tensor, size_i: int
    ) -> Tensor:
        """Attention-weighted source features ``[E, H, C]``."""
        logits = F.leaky_relu(a_src_j + a_dst_i, self.negative_slope)
        alpha = weighted_softmax(logits, edge_weight, index, size_i)
        return alpha.unsqueeze(-1) * x_j


class WeightedGATv2Conv(_AttentionConv):
    """GATv2 layer (Brody et al., 2022) with edge-weighted attention softmax.

    ``e_ij = a . LeakyReLU(W_l x_j + W_r x_i)``, ``alpha`` from
    :func:`weighted_softmax`, ``out_i = sum_j alpha_ij W_l x_j`` per head.

    Args:
        in_channels: input feature size ``F_in``.
        out_channels: per-head output size ``C``.
        heads: number of heads ``H``.
        concat: concatenate heads (``[N, H*C]``) or average them (``[N, C]``).
        negative_slope: LeakyReLU slope inside the attention function.
        share_weights: use the same matrix for ``W_l`` and ``W_r``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        share_weights: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, heads, concat, negative_slope)
        self.lin_l = nn.Linear(in_channels, heads * out_channels, bias=True)
        self.lin_r = self.lin_l if share_weights else nn.Linear(in_channels, heads * out_channels, bias=True)
        self.att = nn.Parameter(torch.empty(1, heads, out_channels))
        nn.init.xavier_uniform_(self.att)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """Map ``x`` ``[N, F_in]`` to ``[N, H*C]`` or ``[N, C]``."""
        index, weight = self._loops(edge_index, edge_weight, x)
        x_l = self.lin_l(x).view(-1, self.heads, self.out_channels)
        x_r = self.lin_r(x).view(-1, self.heads, self.out_channels)
        out = self.propagate(index, x=(x_l, x_r), edge_weight=weight)
        return self._finish(out)

    def message(self, x_j: Tensor, x_i: Tensor, edge_weight: Tensor, index: Tensor, size_i: int) -> Tensor:
        """Attention-weighted source features ``[E, H, C]``."""
        hidden = F.leaky_relu(x_j + x_i, self.negative_slope)
        alpha = weighted_softmax((hidden * self.att).sum(-1), edge_weight, index, size_i)
        return alpha.unsqueeze(-1) * x_j
