"""Memory-bounded batches: many node targets solved as consecutive chunks, merged into the
result one call over all of them gives (SPEC §9).

Every target is an independent problem with its own random stream, learning-rate schedule,
early stop and swap search, so solving the targets in chunks changes nothing but the peak
memory. The chunks' results are kept (and exchanged between ranks) without the feature rows
they copy from the input graph (:func:`without_copied_rows`), and those rows are put back once,
in the merged result (:func:`with_copied_rows`): a problem graph's frozen boundary ring is most
of its rows, so the merged result is built once and not held twice.

A chunk's memory is estimated from its receptive fields (found by one vectorised frontier
expansion): nodes × features and the edges they touch, at a fixed number of bytes each (the
optimiser's copies of a feature entry, a sparse pattern with its transpose per edge).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import Data

from ..graph.neighbourhood import in_edges, rings
from .result import MetamerResult

#: Bytes per receptive-field feature entry: logits, Adam moments, gradient, best state,
#: probabilities and hard mask, activations of the layers above (a generous estimate).
BYTES_PER_ENTRY = 64
#: Bytes per feature of every node of a problem graph, its frozen boundary ring included: the
#: problem graph's features, the metamer's, their copies for scoring.
BYTES_PER_FEATURE = 16
#: Bytes per node of a problem graph: ids, masks, the operators' rows and the swap search's
#: copies of them (up to 16 copies of the problem graph are evaluated at once).
BYTES_PER_NODE = 1024
#: Bytes per edge of a problem graph: CSR and transposed CSR patterns, orders, values, edge
#: gradients, and the swap search's copies.
BYTES_PER_EDGE = 512


def problem_bytes(graph: Data, targets: Tensor, radius: int) -> Tensor:
    """Estimated memory [T] (bytes, int64) of each target's problem: its nodes within ``radius``
    hops (R) times the feature width, every node of its problem graph (R and the boundary ring
    one hop further, counted as at most one node per in-edge of R) and the in-edges of R.
    Calibrated on random graphs of 1 M nodes (20 in-edges each, 100 features)."""
    csr = in_edges(graph.edge_index, graph.num_nodes)
    ring = rings(csr, targets, torch.arange(targets.numel(), device=targets.device), radius)
    count = targets.numel()
    inside = torch.bincount(ring.group, minlength=count)
    edges = torch.zeros_like(inside).index_add_(0, ring.group, csr.rowptr.diff()[ring.node])
    nodes = inside + edges  # the boundary ring has at most one node per in-edge of R
    return inside * graph.x.shape[1] * BYTES_PER_ENTRY \
        + nodes * (graph.x.shape[1] * BYTES_PER_FEATURE + BYTES_PER_NODE) + edges * BYTES_PER_EDGE


def split_targets(costs: Tensor, targets: Tensor, budget: int) -> list[Tensor]:
    """Consecutive runs of ``targets`` [T] whose summed ``costs`` [T] stay within ``budget``
    (a target above the budget on its own forms its own chunk)."""
    start = torch.cumsum(costs, 0) - costs
    chunk = torch.div(start, budget, rounding_mode="floor")
    sizes = torch.unique_consecutive(chunk, return_counts=True)[1]
    return list(targets.split(sizes.tolist()))


def without_copied_rows(result: MetamerResult) -> MetamerResult:
    """``result`` (changed in place) without the feature rows that equal the input graph's:
    the metamer keeps only its free rows (``graph.x`` [free rows, d], in order), the reference
    none (``reference.x`` None). Every other row of both is ``input.x[n_id]``;
    :func:`with_copied_rows` puts them back."""
    result.graph.x = result.graph.x.index_select(0, result.graph.free_mask.nonzero().flatten())
    result.reference.x = None
    return result


def with_copied_rows(result: MetamerResult, graph: Data) -> MetamerResult:
    """``result`` (changed in place) as :func:`without_copied_rows` left it, with the rows it
    copies from ``graph`` (the input graph) put back: reference ``graph.x[n_id]``, metamer the
    same with its free rows."""
    result.reference.x = graph.x.index_select(0, result.reference.n_id)
    metamer = graph.x.index_select(0, result.graph.n_id)
    result.graph.x = metamer.index_copy_(0, result.graph.free_mask.nonzero().flatten(), result.graph.x)
    return result


def _concat_graphs(graphs: list[Data], problems: list[int], graph_level: bool = False) -> Data:
    """Disjoint union of the chunks' problem graphs: node ids, problem ids and centres shifted
    (``graph_level``: centres are graph indices, shifted by the problems before); features
    None when the chunks hold none (:func:`without_copied_rows`)."""
    node_offsets = torch.tensor([0] + [g.n_id.numel() for g in graphs]).cumsum(0)
    problem_offsets = torch.tensor([0] + problems).cumsum(0)
    merged = Data(
        x=None if graphs[0].x is None else torch.cat([g.x for g in graphs]),
        edge_index=torch.cat([g.edge_index + node_offsets[i] for i, g in enumerate(graphs)], dim=1),
        n_id=torch.cat([g.n_id for g in graphs]), free_mask=torch.cat([g.free_mask for g in graphs]),
        batch=torch.cat([g.batch + problem_offsets[i] for i, g in enumerate(graphs)]),
        center=torch.cat([g.center + (problem_offsets if graph_level else node_offsets)[i]
                          for i, g in enumerate(graphs)]))
    if getattr(graphs[0], "edge_weight", None) is not None:
        merged.edge_weight = torch.cat([g.edge_weight for g in graphs])
    if getattr(graphs[0], "y", None) is not None:
        merged.y = torch.cat([g.y for g in graphs])
    return merged


def _padded(history: Tensor, rows: int, last: Tensor) -> Tensor:
    """``history`` [h, T] of one phase continued to ``rows`` rows by its last row (``last`` [T]
    where the phase is empty): a problem that has stopped keeps its loss while the other
    chunks' problems run on."""
    if history.shape[0] == rows:
        return history
    fill = history[-1:] if history.shape[0] else last.reshape(1, -1).to(history.dtype)
    return torch.cat([history, fill.expand(rows - history.shape[0], -1)])


def _merged_history(results: list[MetamerResult]) -> tuple[Tensor, int]:
    """The chunks' loss histories side by side, each phase (gradient steps, swap search)
    padded to the longest chunk's length; returns (history [steps, T], gradient steps). A chunk
    whose swap search ran no iteration (every problem already below its stop) shows its final
    losses through the other chunks' search, as the search shows a problem it never moves."""
    gradient = max(r.gradient_steps for r in results)
    search = max(r.history.shape[0] - r.gradient_steps for r in results)
    columns = []
    for r in results:
        final = torch.as_tensor(r.loss, dtype=r.history.dtype)
        steps = r.history[:r.gradient_steps]
        columns.append(torch.cat([_padded(steps, gradient, final),
                                  _padded(r.history[r.gradient_steps:], search, final)]))
    return torch.cat(columns, dim=1), gradient


def _merged_metrics(parts: list[dict]) -> dict:
    """Per-target metric lists of the chunks laid end to end (nested dictionaries kept; a chunk
    of one problem holds plain values)."""
    if not parts or not parts[0]:
        return {}
    return {key: _merged_metrics([p[key] for p in parts]) if isinstance(parts[0][key], dict)
            else [v for p in parts for v in (p[key] if isinstance(p[key], list) else [p[key]])]
            for key in parts[0]}


def merge_results(results: list[MetamerResult]) -> MetamerResult:
    """One result for the chunks' targets in order, as one batched call returns it (every chunk
    solved with per-target outputs: tensors [T_chunk], histories [steps, T_chunk]). Chunks of a
    batch of graphs (``nodes`` None) hold whole graphs, with node ids already global. Chunks
    without their copied rows (:func:`without_copied_rows`) merge into a result without them."""
    first = results[0]
    graph_level = first.nodes is None
    problems = [r.center.numel() for r in results]
    history, gradient = _merged_history(results)
    graph = _concat_graphs([r.graph for r in results], problems, graph_level)
    cat = lambda name: torch.cat([getattr(r, name) for r in results])  # noqa: E731
    return MetamerResult(
        graph=graph, reference=_concat_graphs([r.reference for r in results], problems, graph_level),
        center=graph.center,
        loss=cat("loss"), history=history, passed=cat("passed"), trivial=cat("trivial"), distance=cat("distance"),
        null_threshold=cat("null_threshold"), twins=cat("twins"),
        metrics=_merged_metrics([r.metrics for r in results]),
        kind=first.kind, layer=first.layer, hops=first.hops,
        nodes=None if graph_level else [v for r in results for v in r.nodes],
        seconds=sum(r.seconds for r in results), settings=first.settings, gradient_steps=gradient)
