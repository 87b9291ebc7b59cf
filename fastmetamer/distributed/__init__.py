"""Scale-out on ``torch.distributed`` (SPEC §10): work shared out across the ranks of an
initialised process group, every rank returning the complete result.

Called on every rank with the same arguments:

- :func:`fastmetamer.generate` with a list of node targets and :func:`fastmetamer.metamer_dimension`
  give each rank one run of consecutive targets, balanced by the size of their receptive fields
  (:func:`share`), and exchange the results with ``all_gather_object``;
- :func:`fastmetamer.generate` with a PyG ``Batch`` of graphs gives each rank a run of the graphs
  (balanced by nodes plus edges) in the same way;
- :func:`fastmetamer.generate` of a whole graph (``node=None``, feature metamers) partitions the
  nodes instead (:mod:`fastmetamer.metamers.partitioned`, :mod:`.halo`, :mod:`.select`);
- :func:`fastmetamer.study.run_study` deals the cells out by model (:func:`alone` keeps each
  cell's calls on its rank) and rank 0 writes the report once every rank has finished.

Each target and each graph has its own random stream and its own problem, so the merged result
is the one a single process returns. Outside a process group, or in a group of one, nothing
changes.

The process group is the caller's: started by ``torchrun`` and initialised with
``torch.distributed.init_process_group`` (gloo on CPU, NCCL on GPU); the command line initialises
it itself when ``torchrun`` started it (:func:`init_from_environment`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
from torch import Tensor


_alone = 0  # > 0 while the calls of this rank run on their own (see alone())


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside one, and inside
    :func:`alone`."""
    if not _alone and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextmanager
def alone():
    """While inside, this rank's calls behave as outside a process group: they share nothing
    (the study runs different cells on different ranks)."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def wait_for_all(timeout: timedelta = timedelta(days=7)) -> None:
    """Block until every rank of the process group arrives here (a gloo barrier with a long
    ``timeout``: ranks that finish their share of a study early wait for the others)."""
    if world()[1] > 1:
        torch.distributed.barrier(group=_patient_group(timeout))


_PATIENT: dict = {}


def _patient_group(timeout: timedelta):
    """A gloo group of every rank with ``timeout``, created once per timeout (collectively)."""
    if timeout not in _PATIENT:
        _PATIENT[timeout] = torch.distributed.new_group(backend="gloo", timeout=timeout)
    return _PATIENT[timeout]


def share(costs: Tensor, parts: int) -> list[int]:
    """Sizes [parts] of consecutive runs of the items with ``costs`` [T] (int64, >= 0), as even
    in summed cost as whole items allow: an item belongs to the run where the midpoint of its
    cost falls on the line [0, total) cut into ``parts`` equal pieces. Every item lies in one
    run; a run may be empty (fewer items than parts). Equal costs (or all zero) split by count."""
    costs = costs.to(torch.long)
    if costs.numel() and int(costs.min()) < 0:
        raise ValueError("costs must be >= 0")
    if costs.numel() == 0 or int(costs.sum()) == 0:
        costs = torch.ones_like(costs)
    total = int(costs.sum()) if costs.numel() else 1
    twice_midpoint = 2 * torch.cumsum(costs, 0) - costs
    owner = torch.div(twice_midpoint * parts, 2 * total, rounding_mode="floor").clamp_(max=parts - 1)
    return torch.bincount(owner, minlength=parts).tolist()


def my_share(costs: Tensor) -> slice:
    """The run of items (a slice of ``costs`` [T]) that this rank solves (everything outside a
    process group)."""
    rank, size = world()
    sizes = share(costs, size)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def all_gather(part) -> list:
    """Every rank's ``part`` (any picklable object), in rank order, on every rank."""
    rank, size = world()
    if size == 1:
        return [part]
    parts = [None] * size
    torch.distributed.all_gather_object(parts, part)
    return parts


def is_sharing() -> bool:
    """Whether calls share their targets out (a process group of more than one rank)."""
    return world()[1] > 1


def init_from_environment() -> bool:
    """Initialise the default process group when ``torchrun`` started this process (``RANK`` and
    ``WORLD_SIZE`` set, more than one rank) and none is initialised yet: NCCL when CUDA is
    available, else gloo. Returns whether this call initialised it (the caller then destroys it
    with ``torch.distributed.destroy_process_group`` when done)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def is_main_rank() -> bool:
    """Whether this process writes the outputs (rank 0, or no process group)."""
    return world()[0] == 0


__all__ = ["world", "share", "my_share", "all_gather", "is_sharing", "init_from_environment", "is_main_rank",
           "alone", "wait_for_all"]
