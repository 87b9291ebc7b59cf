"""Halo exchange: a partitioned model's per-layer collectives (SPEC §10).

Inside :func:`exchanging`, every message-passing layer of the model receives, before it runs,
the current rows of its part's halo from their owners (``all_gather`` of each rank's boundary
block), and each further ``propagate`` of a layer that propagates several times (SGC, APPNP)
receives them again. The backward sends the gradient of the halo rows back to their owners
(``all_reduce`` of the same blocks) and adds it to the owned rows, so every rank's gradient of
its owned rows is the one of the whole graph. Node-wise computation between layers also runs
on the halo rows; those values are overwritten at the next exchange and never reach an owned
row.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

from ..graph.partition import Part


class _Exchange(torch.autograd.Function):
    """``x`` [m, ...] with the halo rows replaced by their owners' rows; backward returns the
    halo rows' gradient to the owners."""

    @staticmethod
    def forward(ctx, x: Tensor, part: Part) -> Tensor:
        ctx.part = part
        block = x.new_zeros(part.width, *x.shape[1:])
        block[:part.send_rows.numel()] = x[part.send_rows]
        blocks = [torch.empty_like(block) for _ in range(part.world)]
        torch.distributed.all_gather(blocks, block)
        out = x.clone()
        out[part.num_owned:part.num_owned + part.num_halo] = torch.cat(blocks)[part.halo_slot]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        part = ctx.part
        halo = slice(part.num_owned, part.num_owned + part.num_halo)
        returned = grad.new_zeros(part.world * part.width, *grad.shape[1:])
        returned.index_add_(0, part.halo_slot, grad[halo])
        torch.distributed.all_reduce(returned)
        out = grad.clone()
        out[halo] = 0
        start = part.rank * part.width
        out.index_add_(0, part.send_rows, returned[start:start + part.send_rows.numel()])
        return out, None


def exchange(x: Tensor, part: Part) -> Tensor:
    """``x`` [m, ...] (one row per local node of ``part``) with its halo rows received from their
    owners; differentiable. Every rank of the process group must call it together."""
    return _Exchange.apply(x, part)


@contextmanager
def exchanging(model: nn.Module, part: Part, traffic: list | None = None):
    """While inside, every ``MessagePassing`` layer of ``model`` exchanges the halo of ``part``
    before it runs and before each of its ``propagate`` calls after the first. ``traffic``
    (optional) gets the bytes each exchange moves across the group (forward)."""
    fresh: dict[int, bool] = {}

    def before_layer(module, args, kwargs):
        fresh[id(module)] = True
        if args:
            return (_exchanged(args[0], part, traffic), *args[1:]), kwargs
        if "x" in kwargs:
            return args, {**kwargs, "x": _exchanged(kwargs["x"], part, traffic)}
        raise TypeError(f"{type(module).__name__} was called without node features x")

    def before_propagate(module, inputs):
        edge_index, size, kwargs = inputs
        if fresh.pop(id(module), False) or not isinstance(kwargs.get("x"), Tensor):
            return None  # first propagate right after the layer's own exchange
        return edge_index, size, {**kwargs, "x": _exchanged(kwargs["x"], part, traffic)}

    layers = [m for m in model.modules() if isinstance(m, MessagePassing)]
    handles = [m.register_forward_pre_hook(before_layer, with_kwargs=True) for m in layers]
    handles += [m.register_propagate_forward_pre_hook(before_propagate) for m in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _exchanged(x, part: Part, traffic: list | None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"a partitioned whole graph needs layers called with one feature matrix, got "
                        f"{type(x).__name__} (bipartite inputs are not partitioned)")
    if x.shape[0] != part.nodes.numel():
        raise ValueError(f"a layer got {x.shape[0]} rows, expected the part's {part.nodes.numel()}")
    if traffic is not None:
        traffic.append(part.world * part.width * x[:1].numel() * x.element_size())
    return exchange(x, part)
