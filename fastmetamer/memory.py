"""Memory budgets of batched work (SPEC §9): how much a batch of targets may use at once."""
from __future__ import annotations

import os

import torch

#: The automatic budget: this share of the memory available when the call starts, at most 2 GiB
#: (what a batch holds at once; the cached whole-graph pass and the graph come on top).
AUTO_SHARE, AUTO_CAP = 0.25, 2 << 30


def default_budget(device: torch.device) -> int:
    """Bytes a batch of targets (``generate``, ``metamer_dimension``) may use when the caller
    gives no ``memory_budget``: a quarter of the memory available now, at most 2 GiB."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_host_bytes()
    return int(min(AUTO_CAP, AUTO_SHARE * free))


def _available_host_bytes() -> int:
    """The host memory available to a new allocation (Linux ``MemAvailable``; else free pages;
    else 8 GiB)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def check_budget(budget) -> None:
    """ValueError unless ``budget`` is None (automatic) or a positive int of bytes."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"memory_budget must be None (automatic) or a positive int of bytes, got {budget!r}")
