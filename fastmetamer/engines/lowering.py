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
Supported: fastmetamer's zoo GCN, GraphSAGE, GIN, SGC (without a residual: K stages of the GCN
operator) and APPNP (its MLP and K propagation stages; not pooled), and PyG's BasicGNN GCN,
GraphSAGE and GIN without normalisation layers or jumping knowledge. Anything else raises
:class:`Unsupported`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..ops.activations import LEAKY_SLOPE

OPERATORS = ("gcn", "gcn_pyg", "mean", "sum_self", "identity")


class Unsupported(Exception):
    """The model (or one of its layers) cannot be lowered; the message names the part."""


@dataclass
class Dense:
    """y = act(x @ weight + bias); weight [in, out]."""

    weight: Tensor
    bias: Tensor | None
    act: str


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

    @property
    def fused_epilogue(self) -> bool:
        """Whether bias, activation and residual all fit the aggregation kernel's epilogue."""
        return not self.post


@dataclass
class Program:
    """Stages from the input to the matched layer, whose output is the last stage's."""

    stages: list[Stage]
    layer: str


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
    from ..models import APPNP as ZooAPPNP, GCN as ZooGCN, GIN as ZooGIN, SGC as ZooSGC, GraphSAGE as ZooSAGE
    from torch_geometric.nn.models import GCN as PygGCN, GIN as PygGIN, GraphSAGE as PygSAGE

    if isinstance(model, (ZooGCN, ZooSAGE, ZooGIN, ZooSGC, ZooAPPNP)):
        return _lower_zoo(model, layer)
    if type(model) in (PygGCN, PygSAGE, PygGIN):
        return _lower_pyg(model, layer)
    raise Unsupported(f"model type {type(model).__name__} is not lowered by the fast engine")


def _matched_index(names: list[str], layer: str) -> int:
    if layer not in names:
        raise Unsupported(f"layer {layer!r} is not a whole message-passing layer ({names})")
    return names.index(layer)


def _lower_zoo(model: nn.Module, layer: str) -> Program:
    if model.readout is not None:
        raise Unsupported("pooling readouts are not lowered")
    last = _matched_index([f"layers.{i}" for i in range(len(model.layers))], layer)
    stages: list[Stage] = []
    for i in range(last + 1):
        stages += _zoo_stages(model.layers[i], len(stages))
    return Program(stages, layer)


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
    if block.act is not None or block.res is not None:
        raise Unsupported("APPNP propagation followed by an activation or residual (a pooled APPNP) is not lowered")
    if start == 0:
        raise Unsupported("APPNP propagation of the raw features (no dense block before it) is not lowered")
    alpha = float(conv.alpha)
    return [Stage(None, "gcn", None, "none", operator_scale=1.0 - alpha, teleport=(start - 1, alpha))
            for _ in range(conv.K)]


def _zoo_stage(block: nn.Module) -> Stage:
    from ..models.convs import WeightedGCNConv, WeightedGINConv, WeightedSAGEConv

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
    raise Unsupported(f"layer type {type(conv).__name__} is not lowered")


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
    from torch_geometric.nn import GCNConv, GINConv, SAGEConv

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
    raise Unsupported(f"layer type {type(conv).__name__} is not lowered")


def _pyg_gin_stage(conv: nn.Module, act: str) -> Stage:
    mlp = conv.nn
    lins = getattr(mlp, "lins", None)
    if lins is None or len(lins) != 2 or any(not isinstance(n, nn.Identity) for n in mlp.norms) \
            or not mlp.plain_last or getattr(mlp, "act_first", False):
        raise Unsupported("GINConv is lowered only with a 2-layer PyG MLP without norms")
    first, second = lins
    return Stage(first.weight.t(), "sum_self", first.bias, activation_name(mlp.act), eps=float(conv.eps),
                 weighted=False, post=[Dense(second.weight.t(), second.bias, act)])
