"""The one dispatch point of the fused ops: which backend implements each op.

Backends: ``reference`` (PyTorch, the oracle, always there), ``cpu`` (C++ / OpenMP extension
``fastmetamer._C``, when built), ``triton`` (GPU, or the CPU interpreter with
``TRITON_INTERPRET=1``), ``cuda`` (CUDA C++, when built with CUDA). ``"auto"`` picks the fastest
available backend for the tensors' device.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType

import torch

OPS = ("aggregate", "loss", "update", "group")
BACKENDS = ("reference", "cpu", "triton", "cuda")


@lru_cache(maxsize=None)
def _module(op: str, backend: str) -> ModuleType | None:
    try:
        module = importlib.import_module(f"fastmetamer.ops.{op}.{backend}")
    except ImportError:
        return None
    return module if getattr(module, "AVAILABLE", True) else None


def is_available(backend: str) -> bool:
    """Whether every op has a usable implementation for ``backend`` in this process."""
    if backend not in BACKENDS:
        return False
    return all(_module(op, backend) is not None for op in OPS)


def available_backends() -> list[str]:
    """Backends usable here, fastest first for this machine."""
    return [b for b in ("cuda", "triton", "cpu", "reference") if is_available(b)]


def resolve(backend: str, device: torch.device | str = "cpu") -> str:
    """Turn ``backend`` (a name or ``"auto"``) into a concrete, available backend name."""
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cpu":
            preferred = ["cuda", "triton", "reference"]
        else:
            preferred = ["cpu", "reference"]
            if os.environ.get("TRITON_INTERPRET") == "1":
                preferred.insert(1, "triton")
        return next(b for b in preferred if is_available(b))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {['auto', *BACKENDS]}")
    if not is_available(backend):
        raise ValueError(f"backend {backend!r} is not available here; available: {available_backends()}")
    return backend


def get(op: str, backend: str) -> ModuleType:
    """The module implementing op family ``op`` (aggregate, loss, update, group) for ``backend``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {list(OPS)}")
    module = _module(op, resolve(backend))
    assert module is not None
    return module


def group_by(keys: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries grouped by key with the fastest backend for ``keys``' device: ``keys`` [E] int64 in
    [0, num_groups) -> (rowptr [num_groups + 1], order [E]), ``order`` a stable argsort of
    ``keys`` and ``rowptr`` its group offsets (the CSR of an edge list keyed by row)."""
    return get("group", resolve("auto", keys.device)).group_by(keys, num_groups)


def append_node_entries(rowptr: torch.Tensor, source: torch.Tensor, edge_id: torch.Tensor,
                        node_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSR (rowptr [n + 1], col [E + n], order [E + n]) of an operator whose coordinate entries
    are a graph's edges then one entry per node, from its in-edge CSR (``rowptr`` [n + 1],
    ``source`` [E], ``edge_id`` [E]) and the node entries' columns ``node_col`` [n], with the
    fastest backend for the tensors' device (see ``ops/group/reference.py``)."""
    return get("group", resolve("auto", rowptr.device)).append_node_entries(rowptr, source, edge_id, node_col)
