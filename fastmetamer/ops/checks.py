"""Input checks shared by the compiled backends' wrappers: a bad tensor is a ValueError naming it,
never a crash inside a kernel."""
from __future__ import annotations

import torch
from torch import Tensor

WHERE = {"cpu": "the CPU", "cuda": "a CUDA device"}


def check_tensor(t: Tensor | None, name: str, dtype: torch.dtype, dim: int, shape: tuple | None = None,
                 device: torch.device | None = None, *, backend: str, host_ok: bool = False) -> torch.device:
    """Raise ValueError unless ``t`` is a contiguous tensor of ``dtype`` with ``dim`` dims (and,
    where given, ``shape``; ``None`` entries match any size) on the ``backend``'s device type
    ("cpu" or "cuda") and, where given, on ``device`` (the other inputs'), or on the CPU when
    ``host_ok``. Returns its device."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    on_host = host_ok and t.device.type == "cpu"
    if t.device.type != backend and not on_host:
        raise ValueError(f"{name} must be on {WHERE[backend]} for the {backend} backend, got {t.device}")
    if device is not None and t.device != device and not on_host:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if shape is not None and any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want}], got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")
    return t.device
