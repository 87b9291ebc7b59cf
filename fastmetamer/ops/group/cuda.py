"""Grouping by key on a GPU for the ``cuda`` backend: as for Triton, PyTorch's device radix sort is
already the fast path, so this runs the reference's torch ops on the device (a bincount and a
stable sort; appending node entries is two scatters)."""
from .. import cuda_library
from .reference import append_node_entries, group_by  # noqa: F401

AVAILABLE = cuda_library.available()
