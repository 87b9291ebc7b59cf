"""Lowering supported models to a short program of known operations (SPEC §7).

A program is a list of :class:`Stage` s, one per message-passing step up to the matched layer:

    y = post( act( s A (x @ weight) [+ x @ root_weight] + bias ) ) + residual(x) + alpha h_src

where A is a sparse operator built from the graph (``operator`` names how: ``"identity"`` for a
dense layer between message-passing ones, e.g. APPNP's MLP) scaled by ``s``
(``operator_scale``); ``weight`` None is the identity (the later hops of a K-step propagation);
``weighted=False`` for layers that ignore edge weights, like PyG's SAGEConv and GINConv; ``post``
is a chain of dense layers (GIN's MLP tail); ``residual`` is None, the identity or x @ matrix;
``teleport`` = (src, alpha) adds alpha times the output of the earlier stage src (APPNP's
personalised-PageRank step (1 - alpha) S h + alpha h_0, as K stages). Linear maps commute with
aggregation, so every dense product happens before the sparse one, on the narrower side.
An attention stage (GAT, GATv2: ``attention`` set, see :class:`Attention`) computes A's values
from its input at every step, one set per head. A pooled program (``Program.pool``) ends with a
global sum / mean / max pooling of the last stage's output per graph (the zoo's ``"readout"``).
Supported: fastmetamer's zoo GCN, GraphSAGE, GIN, GAT, GATv2, SGC (without a residual: K stages
of the GCN operator) and APPNP (its MLP and K propagation stages), pooled or not, and PyG's
BasicGNN GCN, GraphSAGE, GIN and GAT (v1 and v2; without a residual) without normalisation
layers or jumping knowledge. Anything else raises :class:`Unsupported`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..ops.activations import LEAKY_SLOPE

OPERATORS = ("gcn", "gcn_pyg", "mean", "sum_self", "identity", "gat", "gat_pyg")


class Unsupported(Exception):
    """The model (or one of its layers) cannot be lowered; the message names the part."""


@dataclass
class Dense:
    """y = act(x @ weight + bias); weight [in, out]."""

    weight: Tensor
    bias: Tensor | None
    act: str


@dataclass
class Attention:
    """How an attention stage weighs its operator's entries (edges into i, plus one unit self
    loop per node; ``"gat_pyg"`` drops the graph's own self loops, as PyG's GATConv does).

    With xw = x @ stage.weight + ``src_bias`` split into ``heads`` blocks of ``channels``, the
    logit of entry e = (i <- j) in head h is

        GAT:    leaky(att_src_h . xw_jh + att_dst_h . xw_ih)
        GATv2:  att_h . leaky(xw_jh + xr_ih),  xr = x @ dst_weight + dst_bias (xw when shared)

    with LeakyReLU slope ``slope``; alpha = the entries' edge-weighted softmax per row (entries
    of weight 0 take no part), and head h aggregates sum_e alpha_eh xw_jh. Heads are concatenated
    (``concat``) or averaged, then the stage's bias, activation and residual follow."""

    heads: int
    channels: int
    concat: bool
    slope: float
    att_src: Tensor | None = None
    att_dst: Tensor | None = None
    att: Tensor | None = None
    src_bias: Tensor | None = None
    dst_weight: Tensor | None = None
    dst_bias: Tensor | None = None
    shared: bool = True

    @property
    def v2(self) -> bool:
        """True for GATv2's attention (``att`` set)."""
        return self.att is not None


@dataclass
class Stage:
    """One message-passing layer in lowered form (see the module docstring)."""

    weight: Tensor | None
    operator: str
    bias: Tensor | None
    act: str
    root_weight: Tensor | None = None
    eps: float = 0.0
    weighted: bool = True
    post: list[Dense] = field(default_factory=list)
    residual: str | Tensor | None = None
    operator_scale: float = 1.0
    teleport: tuple[int, float] | None = None
    attention: Attention | None = None

    @property
    def fused_epilogue(self) -> bool:
        """Whether bias, activation and residual all fit the aggregation kernel's epilogue."""
        return not self.post and self.attention is None


@dataclass
class Program:
    """Stages from the input to the matched layer, whose output is the last stage's, or, with
    ``pool`` ("add", "mean" or "max"), the last stage's output pooled per graph."""

    stages: list[Stage]
    layer: str
    pool: str | None = None


def activation_name(module: nn.Module | None) -> str:
    """The fused-kernel name of an activation module (``"none"`` for None)."""
    if module is None or isinstance(module, nn.Identity):
        return "none"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.ELU) and module.alpha == 1.0:
        return "elu"
    if isinstance(module, nn.LeakyReLU) and module.negative_slope == LEAKY_SLOPE:
        return "leaky_relu"
    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return "gelu"
    raise Unsupported(f"activation {module!r} has no fused kernel")


def lower(model: nn.Module, layer: str) -> Program:
    """Lower ``model`` up to the module named ``layer``; raises :class:`Unsupported`."""
    from ..models import APPNP as ZooAPPNP, GAT as ZooGAT, GCN as ZooGCN, GIN as ZooGIN, SGC as ZooSGC, \
        GraphSAGE as ZooSAGE
    from torch_geometric.nn.models import GAT as PygGAT, GCN as PygGCN, GIN as PygGIN, GraphSAGE as PygSAGE

    if isinstance(model, (ZooGCN, ZooSAGE, ZooGIN, ZooGAT, ZooSGC, ZooAPPNP)):  # ZooGAT covers GATv2
        return _lower_zoo(model, layer)
    if type(model) in (PygGCN, PygSAGE, PygGIN, PygGAT):
        return _lower_pyg(model, layer)
    raise Unsupported(f"model type {type(model).__name__} is not lowered by the fast engine")


def _matched_index(names: list[str], layer: str) -> int:
    if layer not in names:
        raise Unsupported(f"layer {layer!r} is not a whole message-passing layer ({names})")
    return names.index(layer)


def _lower_zoo(model: nn.Module, layer: str) -> Program:
    names = [f"layers.{i}" for i in range(len(model.layers))]
    pooled = model.readout is not None and layer == "readout"
    last = len(names) - 1 if pooled else _matched_index(names, layer)
    stages: list[Stage] = []
    for i in range(last + 1):
        stages += _zoo_stages(model.layers[i], len(stages))
    return Program(stages, layer, model.readout.mode if pooled else None)


def _zoo_stages(block: nn.Module, start: int) -> list[Stage]:
    """The stages of one zoo block whose first stage is the program's ``start``-th: one, or K
    for the K hops of SGC and APPNP."""
    from ..models.convs import APPNPPropagation, WeightedSGConv

    conv = block.conv
    if isinstance(conv, nn.Linear):  # a dense block (APPNP's MLP): the identity operator
        return [Stage(conv.weight.t(), "identity", conv.bias, activation_name(block.act), weighted=False,
                      residual=_residual(block.res))]
    if isinstance(conv, APPNPPropagation):
        return _appnp_stages(block, conv, start)
    if not isinstance(conv, WeightedSGConv):
        return [_zoo_stage(block)]
    if block.res is not None:
        raise Unsupported("SGC with a residual is not lowered")
    # S^K (X W) + b: the product first (the narrower side), then K propagations, the bias and
    # the block's activation after the last
    hops = [Stage(conv.lin.weight.t() if k == 0 else None, "gcn", None, "none") for k in range(conv.K)]
    hops[-1].bias, hops[-1].act = conv.bias, activation_name(block.act)
    return hops


def _appnp_stages(block: nn.Module, conv: nn.Module, start: int) -> list[Stage]:
    """h <- (1 - alpha) S h + alpha h_0, K times: K GCN stages scaled by 1 - alpha, each with the
    teleport term from the stage before the first (whose output is h_0)."""
    if block.res is not None:
        raise Unsupported("APPNP propagation followed by a residual is not lowered")
    if start == 0:
        raise Unsupported("APPNP propagation of the raw features (no dense block before it) is not lowered")
    alpha = float(conv.alpha)
    hops = [Stage(None, "gcn", None, "none", operator_scale=1.0 - alpha, teleport=(start - 1, alpha))
            for _ in range(conv.K)]
    if block.act is not None:  # a pooled APPNP: the activation after the last hop's teleport term
        hops.append(Stage(None, "identity", None, activation_name(block.act), weighted=False))
    return hops


def _zoo_stage(block: nn.Module) -> Stage:
    from ..models.convs import WeightedGATConv, WeightedGATv2Conv, WeightedGCNConv, WeightedGINConv, WeightedSAGEConv

    conv, act = block.conv, activation_name(block.act)
    residual = _residual(block.res)
    if isinstance(conv, WeightedGCNConv):
        return Stage(conv.lin.weight.t(), "gcn", conv.bias, act, residual=residual)
    if isinstance(conv, WeightedSAGEConv):
        return Stage(conv.lin_l.weight.t(), "mean", conv.lin_l.bias, act,
                     root_weight=conv.lin_r.weight.t(), residual=residual)
    if isinstance(conv, WeightedGINConv):
        first, mid, second = conv.mlp
        return Stage(first.weight.t(), "sum_self", first.bias, activation_name(mid), eps=float(conv.eps),
                     post=[Dense(second.weight.t(), second.bias, act)], residual=residual)
    if isinstance(conv, (WeightedGATConv, WeightedGATv2Conv)):
        weight = (conv.lin_l if isinstance(conv, WeightedGATv2Conv) else conv.lin).weight.t()
        return Stage(weight, "gat", conv.bias, act, residual=residual, attention=_attention(conv))
    raise Unsupported(f"layer type {type(conv).__name__} is not lowered")


def _attention(conv: nn.Module) -> Attention:
    """The :class:`Attention` of a zoo or PyG GAT / GATv2 layer (heads H, channels C)."""
    heads, channels = conv.heads, conv.out_channels
    common = dict(heads=heads, channels=channels, concat=bool(conv.concat), slope=float(conv.negative_slope))
    if hasattr(conv, "att"):  # GATv2: x_l = lin_l(x) on the sources, x_r = lin_r(x) on the destinations
        shared = conv.lin_r is conv.lin_l
        return Attention(**common, att=conv.att.reshape(heads, channels), src_bias=conv.lin_l.bias,
                         dst_weight=None if shared else conv.lin_r.weight.t(),
                         dst_bias=None if shared else conv.lin_r.bias, shared=shared)
    return Attention(**common, att_src=conv.att_src.reshape(heads, channels),
                     att_dst=conv.att_dst.reshape(heads, channels))


def _residual(res: nn.Module | None) -> str | Tensor | None:
    if res is None:
        return None
    if isinstance(res, nn.Identity):
        return "identity"
    if isinstance(res, nn.Linear) and res.bias is None:
        return res.weight.t()
    raise Unsupported(f"residual map {res!r} is not lowered")


def _lower_pyg(model: nn.Module, layer: str) -> Program:
    if getattr(model, "jk_mode", None) is not None or any(not isinstance(n, nn.Identity) for n in model.norms):
        raise Unsupported("PyG models with normalisation layers or jumping knowledge are not lowered")
    if getattr(model, "act_first", False):
        raise Unsupported("act_first=True is not lowered")
    last = _matched_index([f"convs.{i}" for i in range(len(model.convs))], layer)
    act = activation_name(model.act)
    # BasicGNN applies the activation after every conv but the last; "convs.i" is the conv's
    # own (pre-activation) output, so the matched stage gets no activation.
    return Program([_pyg_stage(model.convs[i], act if i < last else "none") for i in range(last + 1)], layer)


def _pyg_stage(conv: nn.Module, act: str) -> Stage:
    from torch_geometric.nn import GATConv, GATv2Conv, GCNConv, GINConv, SAGEConv

    if isinstance(conv, GCNConv):
        if conv.improved or not conv.add_self_loops or not conv.normalize:
            raise Unsupported("GCNConv with improved / no self loops / no normalisation is not lowered")
        return Stage(conv.lin.weight.t(), "gcn_pyg", conv.bias, act)
    if isinstance(conv, SAGEConv):
        if conv.project or conv.normalize or str(conv.aggr) != "mean" or not conv.root_weight:
            raise Unsupported("SAGEConv other than mean aggregation with root weight is not lowered")
        return Stage(conv.lin_l.weight.t(), "mean", conv.lin_l.bias, act,
                     root_weight=conv.lin_r.weight.t(), weighted=False)
    if isinstance(conv, GINConv):
        return _pyg_gin_stage(conv, act)
    if isinstance(conv, (GATConv, GATv2Conv)):
        return _pyg_gat_stage(conv, act)
    raise Unsupported(f"layer type {type(conv).__name__} is not lowered")


def _pyg_gat_stage(conv: nn.Module, act: str) -> Stage:
    """PyG's GATConv / GATv2Conv: existing self loops removed and one unit loop per node added
    (``"gat_pyg"``); no edge features, no residual (PyG adds it before the activation)."""
    v2 = hasattr(conv, "att")
    if getattr(conv, "edge_dim", None) is not None or not conv.add_self_loops or getattr(conv, "res", None) is not None \
            or (not v2 and conv.lin is None):
        raise Unsupported(f"{type(conv).__name__} with edge features, a residual, no self loops or bipartite "
                          "weights is not lowered")
    weight = (conv.lin_l if v2 else conv.lin).weight.t()
    return Stage(weight, "gat_pyg", conv.bias, act, weighted=False, attention=_attention(conv))


def _pyg_gin_stage(conv: nn.Module, act: str) -> Stage:
    mlp = conv.nn
    lins = getattr(mlp, "lins", None)
    if lins is None or len(lins) != 2 or any(not isinstance(n, nn.Identity) for n in mlp.norms) \
            or not mlp.plain_last or getattr(mlp, "act_first", False):
        raise Unsupported("GINConv is lowered only with a 2-layer PyG MLP without norms")
    first, second = lins
    return Stage(first.weight.t(), "sum_self", first.bias, activation_name(mlp.act), eps=float(conv.eps),
                 weighted=False, post=[Dense(second.weight.t(), second.bias, act)])
