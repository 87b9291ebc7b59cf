"""Input checks shared by every public entry point.

Each check raises a ``ValueError`` or ``TypeError`` whose message names the problem and what is
allowed, so bad input never reaches a kernel.
"""
from __future__ import annotations

import copy
import numbers
import weakref
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from .graph.kwargs import ForwardKwargs
from .graph.layers import count_hops


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite. One reduction and no mask for the common case: a
    NaN or an infinity makes the sum non-finite, so a finite sum proves them absent (a sum that
    overflows falls back to the elementwise check)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def is_binary(t: Tensor) -> bool:
    """Whether every entry of ``t`` is exactly 0 or 1. Checked in slices of 2^18 entries (small
    temporaries that stay in cache; the first slice with another value ends the check); the
    answer is remembered for as long as ``t`` lives unchanged (a graph's features are checked
    once, not at every call on it)."""
    key = id(t)
    known = _BINARY.get(key)
    if known is not None and known[0]() is t and known[1] == t._version:
        return known[2]
    answer = all(bool(((part == 0) | (part == 1)).all()) for part in t.reshape(-1).split(1 << 18))
    _BINARY[key] = (weakref.ref(t, lambda _, key=key: _BINARY.pop(key, None)), t._version, answer)
    return answer


#: ``id(tensor)`` -> (weak reference, tensor version, is_binary); entries die with the tensor.
_BINARY: dict[int, tuple] = {}


def check_graph(graph: Data) -> None:
    """Check that ``graph`` is a PyG ``Data`` with finite float features and a valid edge list.

    Requires ``graph.x`` of shape [n, d] (floating point, no NaN/Inf), ``graph.edge_index`` of
    shape [2, E] (int64 or int32, ids in [0, n)), and, if present, ``graph.edge_weight`` of shape
    [E] (finite, >= 0).
    """
    if not isinstance(graph, Data):
        raise TypeError(f"graph must be a torch_geometric.data.Data, got {type(graph).__name__}")
    x = getattr(graph, "x", None)
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError("graph.x must be a 2-D tensor of node features [num_nodes, num_features]")
    if not x.is_floating_point():
        raise TypeError(f"graph.x must be floating point, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("graph has no nodes (graph.x has 0 rows)")
    if not all_finite(x):
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"graph.x contains NaN or Inf values (first affected nodes: {bad})")
    check_edge_index(getattr(graph, "edge_index", None), x.shape[0])
    for name in ("edge_index", "edge_weight", "batch"):
        value = getattr(graph, name, None)
        if isinstance(value, Tensor) and value.device != x.device:
            raise ValueError(f"graph.{name} is on {value.device} but graph.x is on {x.device}; "
                             "move the whole graph with graph.to(device)")
    weight = getattr(graph, "edge_weight", None)
    if weight is not None:
        if weight.shape != (graph.edge_index.shape[1],):
            raise ValueError(
                f"graph.edge_weight must have shape [{graph.edge_index.shape[1]}] "
                f"(one weight per edge), got {tuple(weight.shape)}")
        if not all_finite(weight):
            raise ValueError("graph.edge_weight contains NaN or Inf values")
        if weight.numel() and bool((weight < 0).any()):
            raise ValueError(f"graph.edge_weight has negative values (min {float(weight.min()):g}); "
                             "edge weights must be >= 0 (degree normalisation takes their roots)")


def check_edge_index(edge_index, num_nodes: int) -> None:
    """Check an edge list: a [2, E] integer tensor with ids in [0, num_nodes)."""
    if not isinstance(edge_index, Tensor):
        raise TypeError("graph.edge_index must be a tensor of shape [2, num_edges]")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"graph.edge_index must have dtype torch.long or torch.int32, got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(
            f"graph.edge_index must have shape [2, num_edges], got {tuple(edge_index.shape)}")
    if edge_index.numel() and (edge_index.min() < 0 or edge_index.max() >= num_nodes):
        raise ValueError(
            f"graph.edge_index has node ids outside [0, {num_nodes}): "
            f"min {int(edge_index.min())}, max {int(edge_index.max())}")


def check_nodes(node, num_nodes: int, device: torch.device | str = "cpu") -> Tensor | None:
    """Normalise a target specification to a 1-D long tensor of distinct node ids on ``device`` (the
    graph's), or ``None``.

    ``node`` may be ``None`` (all nodes jointly), an int (Python or numpy), or a sequence, 1-D
    tensor or numpy array of ints.
    """
    if node is None:
        return None
    ids = _node_ids(node)
    if ids.numel() == 0:
        raise ValueError("node list is empty: give at least one target node (or None for all)")
    if ids.min() < 0 or ids.max() >= num_nodes:
        bad = ids[(ids < 0) | (ids >= num_nodes)].tolist()[:5]
        raise ValueError(f"node ids out of range [0, {num_nodes}): {bad}")
    if ids.unique().numel() != ids.numel():
        raise ValueError("node list contains duplicate ids; each target must appear once")
    return ids.to(device)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _node_ids(node) -> Tensor:
    """``node`` as a 1-D long CPU tensor (not yet range-checked)."""
    if isinstance(node, (bool, np.bool_)):
        raise TypeError("node must be an int, a list of ints or None, got a bool")
    if _is_int(node):
        return torch.tensor([int(node)])
    if isinstance(node, np.ndarray):
        if node.dtype.kind not in "iu":
            raise TypeError(f"a node array must hold integers, got dtype {node.dtype}")
        node = torch.from_numpy(node.astype(np.int64))
    if isinstance(node, Tensor):
        if node.is_floating_point() or node.dtype == torch.bool or node.dim() > 1:
            raise TypeError("a node tensor must be a 0-D or 1-D integer tensor")
        return node.reshape(-1).long().cpu()
    if isinstance(node, Sequence) and not isinstance(node, str):
        if not all(_is_int(v) for v in node):
            raise TypeError("node list must contain only ints")
        return torch.tensor([int(v) for v in node], dtype=torch.long)
    raise TypeError(f"node must be an int, a list of ints or None, got {type(node).__name__}")


def check_hops(hops) -> int | None:
    """Check a receptive-field radius override: None (count it) or an int >= 0; returns it as int."""
    if hops is None:
        return None
    if not _is_int(hops) or hops < 0:
        raise ValueError(f"hops must be None (counted from the model) or an int >= 0, got {hops!r}")
    return int(hops)


def model_input(model: nn.Module, graph: Data) -> Data:
    """``graph`` made ready for ``model``: ``edge_index`` as int64, ``x`` and ``edge_weight`` in
    the floating dtype of the model's parameters (a float64 graph works with a float32 model).

    Raises ValueError when the model's parameters and ``graph.x`` lie on different devices.
    Returns ``graph`` itself when nothing changes, else a shallow copy: the caller's graph is never
    modified.
    """
    check_devices(model, graph)
    dtype = next((t.dtype for t in _tensors(model) if t.is_floating_point()), None)
    changes = {"edge_index": graph.edge_index.long()} if graph.edge_index.dtype != torch.long else {}
    weight = getattr(graph, "edge_weight", None)
    for key, value in (("x", graph.x), ("edge_weight", weight)):
        if dtype is not None and value is not None and value.dtype != dtype:
            changes[key] = value.to(dtype)
            if not torch.isfinite(changes[key]).all():
                raise ValueError(f"graph.{key} has values beyond the range of the model's {dtype}")
    if not changes:
        return graph
    out = copy.copy(graph)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def check_devices(model: nn.Module, graph: Data) -> None:
    """ValueError unless every parameter and buffer of ``model`` lies on ``graph.x``'s device."""
    devices = {t.device for t in _tensors(model)}
    if devices - {graph.x.device}:
        raise ValueError(f"the model's parameters are on {sorted(map(str, devices))} but graph.x is "
                         f"on {graph.x.device}; move both to one device (model.to(device), "
                         "graph.to(device))")


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def check_feature_width(model: nn.Module, layer: str, x: Tensor,
                        forward_kwargs: ForwardKwargs | None = None) -> None:
    """Run ``model`` up to ``layer`` on a two-node probe graph built from ``x`` [n, d]; a failure
    becomes a ValueError naming the feature width d and, when a probe of the width the model
    declares (the first module with ``in_channels`` / ``in_features``) runs, that width."""
    try:
        count_hops(model, layer, x, forward_kwargs)
    except RuntimeError as err:
        width = _input_width(model)
        if width not in (None, x.shape[1]) and _runs(model, layer, x.new_zeros(2, width), forward_kwargs):
            raise ValueError(f"graph.x has {x.shape[1]} features per node but the model takes "
                             f"{width}") from err
        raise ValueError(f"the model fails on a two-node probe graph (graph.x has {x.shape[1]} features "
                         f"per node): {err}; check that the graph and forward_kwargs fit the model") from err


def _runs(model: nn.Module, layer: str, x: Tensor, forward_kwargs: ForwardKwargs | None) -> bool:
    """Whether the probe of :func:`check_feature_width` runs on features ``x`` [2, d]."""
    try:
        count_hops(model, layer, x, forward_kwargs)
    except RuntimeError:
        return False
    return True


def _input_width(model: nn.Module) -> int | None:
    """The input width of the first module that declares one (``in_channels`` or ``in_features``)."""
    for module in model.modules():
        for name in ("in_channels", "in_features"):
            width = getattr(module, name, None)
            if _is_int(width) and width > 0:
                return int(width)
    return None


def check_forward_kwargs(forward_kwargs: ForwardKwargs, kind: str, device: torch.device) -> None:
    """Tensor arguments must lie on the graph's ``device``; per-edge ones belong to the reference's
    edges, so metamer kinds that change the edges (``"structure"``, ``"joint"``) refuse them."""
    elsewhere = sorted(k for k, v in forward_kwargs.as_dict().items()
                       if isinstance(v, Tensor) and v.device != device)
    if elsewhere:
        raise ValueError(f"forward_kwargs {elsewhere} are not on graph.x's device {device}; move them there")
    if forward_kwargs.edges and kind != "features":
        raise ValueError(f"forward_kwargs {sorted(forward_kwargs.edges)} are per-edge, but a {kind} "
                         "metamer changes the edges; per-edge arguments work with kind='features'")
