"""Fused graph ops with interchangeable backends (SPEC §7).

Each op family lives in its own folder with one file per backend: ``reference.py`` (plain
PyTorch, the oracle), ``cpu.py`` (C++), ``triton.py``; :mod:`fastmetamer.ops.dispatch` chooses.

- ``aggregate``: CSR aggregation with fused bias/activation/residual epilogue
  (``aggregate_forward``), backward over the cached transpose fused with the activation
  derivative (``aggregate_backward``), edge-weight gradient / SDDMM (``edge_grad``).
- ``loss``: the matched layer fused with the activation-matching loss (``matched_loss``).
- ``update``: straight-through top-rho selection (``top_mask``) and the fused margin + Adam step
  with the projection of the logits to [-bound, bound] (``adam_ste_update``).
"""
from .dispatch import available_backends, get, is_available, resolve

__all__ = ["available_backends", "get", "is_available", "resolve"]
