"""Catch tensors built on the CPU where the graph lives on a GPU, without a GPU (SPEC §7 device rule).

Inside :func:`audit`, tensors wrapped by :func:`on_device` claim to live on the ``meta`` device (a
stand-in for ``cuda``: its factories need no driver) while their data stays on the CPU, so the
whole pipeline still computes real values. Every op that mixes such a tensor with a plain CPU
tensor of one or more dimensions is recorded with the library line that issued it; on a GPU that
op raises "Expected all tensors to be on the same device" or copies host memory every call (CPU
index tensors). Factories called with the device of a wrapped tensor (``torch.zeros(n,
device=x.device)``, ``torch.tensor(data, device=...)``, ``x.new_zeros``) give wrapped tensors;
``.to(device)`` and ``copy_`` are explicit transfers and are allowed, as are 0-dim CPU tensors
(CUDA accepts them as scalars).

What it cannot catch: code that branches on ``device.type == "cuda"`` (the stand-in is ``meta``),
tensors kept on the CPU on purpose and never mixed with device tensors, host syncs (``.item()``,
``.tolist()``: they work on the stand-in), and kernels of the compiled backends (it runs the
``reference`` ops).
"""
from __future__ import annotations

import linecache
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
PACKAGE = str(Path(__file__).resolve().parents[1] / "fastmetamer")
TORCH = str(Path(torch.__file__).parent)
TRANSFERS = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
ORIGIN = "_device_audit_origin"  # attribute of a CPU tensor: the library line that built its data


class OnDevice(torch.Tensor):
    """A CPU tensor that claims to live on :data:`DEVICE`; only usable inside :func:`audit`."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=data.dtype,
                                                device=DEVICE, requires_grad=data.requires_grad)
        t.host = data
        return t

    def __repr__(self) -> str:
        return f"OnDevice({self.host!r})"

    @property
    def is_cuda(self) -> bool:
        """True, as for the GPU tensors it stands in for (PyG's collate places ``batch`` by it)."""
        return True

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an OnDevice tensor outside device_audit.audit()")


def on_device(value):
    """``value`` (a tensor, a PyG ``Data``/``Batch`` or a module, in place) moved to the stand-in."""
    if isinstance(value, torch.Tensor):
        return OnDevice(value)
    if isinstance(value, nn.Module):
        for module in value.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(OnDevice(p.detach()), p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = OnDevice(b)
        return value
    return value.apply(OnDevice)


def _on_stand_in(device) -> bool:
    return device is not None and torch.device(device) == DEVICE


def _caller() -> str:
    """The innermost line of the library in the current stack (else of the caller's code)."""
    frame, outside = sys._getframe(1), None
    while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
        if outside is None and not frame.f_code.co_filename.startswith((TORCH, __file__)):
            outside = frame
        frame = frame.f_back
    frame = frame or outside
    path, line = frame.f_code.co_filename, frame.f_lineno
    return f"{Path(path).name if frame is outside else Path(path).relative_to(Path(PACKAGE).parent)}:{line}: " \
           f"{linecache.getline(path, line).strip()}"


class _Factories(TorchFunctionMode):
    """``torch.tensor(data, device=stand-in)`` and friends (or of an :class:`OnDevice` tensor) copy
    without dispatching; neither do ``tolist`` nor ``to(stand-in)`` of a CPU tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray):
            device = kwargs.get("device")
            if _on_stand_in(device) or (device is None and isinstance(args[0], OnDevice)):
                data = args[0].host if isinstance(args[0], OnDevice) else args[0]
                return OnDevice(func(data, *args[1:], **{**kwargs, "device": "cpu"}))
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):
            return args[0].host.tolist()
        if func is torch.Tensor.to and not isinstance(args[0], OnDevice):
            device, dtype, *_ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if _on_stand_in(device):
                return OnDevice(args[0].to(dtype=dtype or args[0].dtype))
        return func(*args, **kwargs)


class _Audit(TorchDispatchMode):
    def __init__(self, findings: dict[str, str]):
        super().__init__()
        self.findings = findings

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        factory = _on_stand_in(kwargs.get("device"))
        moved = any(isinstance(t, OnDevice) for t in tensors) or factory
        host = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0]
        if moved and host and func not in TRANSFERS:
            self._record(f"{func} mixes a device tensor with a CPU tensor of shape {tuple(host[0].shape)} "
                         f"built at {getattr(host[0], ORIGIN, '(before the audit)')}")
        generator = kwargs.get("generator")
        if factory and generator is not None and generator.device.type != DEVICE.type:
            self._record(f"{func} draws device values from a {generator.device.type} generator")
        args, kwargs = tree_map(lambda a: a.host if isinstance(a, OnDevice) else a, (args, kwargs))
        if factory:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func is torch.ops.aten._to_copy.default and "device" in kwargs:
            moved = _on_stand_in(kwargs["device"])
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*args, **kwargs)
        if moved:
            return tree_map(lambda o: OnDevice(o) if isinstance(o, torch.Tensor) else o, out)
        origin = next((getattr(t, ORIGIN) for t in host if hasattr(t, ORIGIN)), None) or _caller()
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and not hasattr(o, ORIGIN):
                setattr(o, ORIGIN, origin)
        return out

    def _record(self, message: str) -> None:
        self.findings.setdefault(_caller(), message)


@contextmanager
def audit():
    """Run the block with the stand-in device; yields a dict {library line: what it mixed}."""
    findings: dict[str, str] = {}
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # module.double() etc. of OnDevice parameters
    try:
        with _Factories(), _Audit(findings):
            yield findings
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
