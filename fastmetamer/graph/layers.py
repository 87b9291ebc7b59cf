"""Choosing the matched layer of a model and reading its output.

A *layer* is a module of the model whose output H^l [num_nodes, d_l] is matched. It is named by
module name (``"convs.1"``, ``"layers.0"``) or by index among the model's message-passing layers:
the names in ``model.metamer_layers`` when the model declares them (fastmetamer's zoo does),
otherwise the outermost ``torch_geometric.nn.MessagePassing`` modules in registration order.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

from .kwargs import ForwardKwargs


class _LayerReached(Exception):
    """Raised inside a forward hook to stop the forward pass once the layer has run."""


def message_passing_layers(model: nn.Module) -> list[str]:
    """Names of the layers that an integer ``layer=`` indexes, in forward order."""
    declared = getattr(model, "metamer_layers", None)
    if declared is not None:
        return list(declared)
    names = []
    for name, module in model.named_modules():
        inside_other = any(name.startswith(prev + ".") for prev in names)
        if isinstance(module, MessagePassing) and not inside_other:
            names.append(name)
    return names


def resolve_layer(model: nn.Module, layer: str | int | None) -> str:
    """Return the module name of the matched layer (default: the last message-passing layer)."""
    modules = dict(model.named_modules())
    candidates = message_passing_layers(model)
    if layer is None or isinstance(layer, int) and not isinstance(layer, bool):
        if not candidates:
            raise ValueError(
                "the model has no message-passing layers to match; pass layer=<module name>, "
                f"one of: {_short_list(n for n in modules if n)}")
        if layer is None:
            return candidates[-1]
        if not -len(candidates) <= layer < len(candidates):
            raise ValueError(
                f"layer index {layer} out of range: the model has {len(candidates)} "
                f"message-passing layers {candidates}")
        return candidates[layer]
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name, an int index or None, got {type(layer).__name__}")
    if layer not in modules or layer == "":
        raise ValueError(
            f"unknown layer {layer!r}; valid layer names: {_short_list(n for n in modules if n)}")
    return layer


def _short_list(names, limit: int = 40) -> str:
    names = list(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def accepts_keyword(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a parameter called ``name``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def call_model(model: nn.Module, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None,
               batch: Tensor | None = None, forward_kwargs: dict | None = None):
    """Call ``model(x, edge_index, ...)``, passing only what is given.

    ``edge_weight`` [E] goes by keyword when ``model.forward`` names a parameter ``edge_weight``,
    else as the third positional argument; ``batch`` [n] only when ``forward`` takes it;
    ``forward_kwargs`` (e.g. ``{"edge_attr": ...}``, already matching this graph) as keywords.
    """
    kwargs = dict(forward_kwargs or {})
    args = (x, edge_index)
    if edge_weight is not None:
        if accepts_keyword(model, "edge_weight"):
            kwargs["edge_weight"] = edge_weight
        else:
            args = (x, edge_index, edge_weight)
    if batch is not None and accepts_keyword(model, "batch"):
        kwargs["batch"] = batch
    return model(*args, **kwargs)


@contextmanager
def _capture(model: nn.Module, layer: str, stop: bool):
    store: dict = {}

    def hook(_module, _inputs, output):
        store.setdefault("out", output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _LayerReached

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def layer_output(model: nn.Module, layer: str, x: Tensor, edge_index: Tensor,
                 edge_weight: Tensor | None = None, batch: Tensor | None = None,
                 forward_kwargs: dict | None = None) -> Tensor:
    """Output of module ``layer`` when ``model`` runs on the graph; the forward stops there.

    ``forward_kwargs``: extra keyword arguments of the model's forward, matching this graph.

    Returns a tensor [num_nodes, d_l] (or [num_graphs, d_l] for a pooling readout).
    """
    with _capture(model, layer, stop=True) as store:
        try:
            call_model(model, x, edge_index, edge_weight, batch, forward_kwargs)
        except _LayerReached:
            pass
    if "out" not in store:
        raise ValueError(f"layer {layer!r} was not called during the model's forward pass")
    out = store["out"]
    if not isinstance(out, Tensor):
        raise TypeError(f"layer {layer!r} returned {type(out).__name__}, expected a tensor")
    return out


def count_hops(model: nn.Module, layer: str, x: Tensor, forward_kwargs: ForwardKwargs | None = None) -> int:
    """Number of message-passing steps (``propagate`` calls) that run before ``layer``'s output.

    H^l[v] depends only on nodes within this many hops of v. Measured on a two-node probe graph
    built from the first rows of ``x`` [n, d] (and of the per-node / per-edge tensors of
    ``forward_kwargs``, see :meth:`~fastmetamer.graph.kwargs.ForwardKwargs.probe`).
    """
    calls = []
    hooks = [m.register_propagate_forward_pre_hook(lambda *_: calls.append(1))
             for m in model.modules() if isinstance(m, MessagePassing)]
    rows = x[:2] if x.shape[0] >= 2 else x.repeat(2, 1)
    probe_edges = torch.tensor([[0, 1], [1, 0]], device=x.device)
    extra = None if forward_kwargs is None else forward_kwargs.probe()
    try:
        with torch.no_grad():
            layer_output(model, layer, rows, probe_edges, forward_kwargs=extra)
    finally:
        for h in hooks:
            h.remove()
    return len(calls)
