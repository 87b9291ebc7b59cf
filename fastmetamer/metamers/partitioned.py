"""A whole-graph feature metamer partitioned across the ranks of a process group (SPEC §10).

Called on every rank with the same arguments, :func:`generate_partitioned` gives each rank a
:class:`~fastmetamer.graph.partition.Part` of the nodes. A rank holds the parameters, Adam
moments and gradient of its owned rows only, and runs the model (the reference engine: plain
autograd) on its part with the halo exchanged per layer (:mod:`fastmetamer.distributed.halo`).
The loss is an ``all_reduce`` of the ranks' squared errors over the global ||H||^2, the binary
top-rho selection a distributed selection (:mod:`fastmetamer.distributed.select`); the feature
statistics and the initial draw are the single process's (each rank keeps its rows), so the
optimisation is the one a single process runs, up to float rounding. At the end the ranks
exchange their best rows and activations, and every rank scores and returns the complete
result.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .. import distributed
from ..distributed.halo import exchanging
from ..distributed.select import top_k
from ..engines import loss_scale
from ..graph.layers import layer_output
from ..graph.partition import Part, build_part, owners
from ..graph.subgraph import Subgraph, whole_graph
from ..validation import is_binary
from .criterion import whole_graph_passes
from .features import FeatureParam, draw_noise, feature_stats
from .optimize import BestStates, run_schedule

#: How the nodes are ordered before they are cut into the ranks' runs (recorded in the result).
ORDER = "reverse Cuthill-McKee"


def not_partitioned(model: nn.Module, layer: str, graph, kind: str, opts, extra) -> str | None:
    """Why a whole-graph problem inside a process group is *not* partitioned (None: it is).
    Those problems are solved whole on every rank instead."""
    if getattr(graph, "batch", None) is not None:
        return "a batch of graphs"
    probe = torch.tensor([[0, 1], [1, 0]], device=graph.x.device)
    with torch.no_grad():
        if layer_output(model, layer, graph.x[:1].repeat(2, 1), probe).shape[0] != 2:
            return "a graph-level (pooled) layer"
    if kind != "features":
        return f"kind={kind!r} (only feature metamers are partitioned)"
    if opts.size_independent:
        return "size_independent=True (its parameters are shared by every node)"
    if extra:
        return "forward_kwargs"
    return None


class PartitionedEngine:
    """The reference engine on one rank's part: activations of the owned rows with the halo
    exchanged per layer, and the global loss L_act = sum_ranks ||H'_O - H_O||^2 / ||H||^2.

    Args:
        model, layer: the model and the matched layer.
        sub: the part as a problem graph (owned rows free and the targets).
        part: the partition (exchange plan).
        target: reference activations of the owned rows [|O|, d_l]; scale: ||H||^2 [1] of all nodes.
    """

    name = "reference"

    def __init__(self, model: nn.Module, layer: str, sub: Subgraph, part: Part, target: Tensor, scale: Tensor):
        self.model, self.layer, self.sub, self.part = model, layer, sub, part
        self.target, self.scale = target, scale
        self.traffic: list[int] = []

    def activations(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """Layer-l activations of the owned rows [|O|, d_l] (every rank calls it together)."""
        with exchanging(self.model, self.part, self.traffic):
            out = layer_output(self.model, self.layer, x, edge_index, edge_weight)
        if out.shape[0] != x.shape[0]:
            raise ValueError(f"layer {self.layer!r} is graph-level (pooled): a whole graph is partitioned "
                             "only for a node-level layer")
        return out[self.sub.center]

    def losses(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """[1] the global L_act; its gradient is this rank's share (the exchanges' backward
        delivers the rest)."""
        local = (self.activations(x, edge_index, edge_weight) - self.target).pow(2).sum()
        total = local.detach().clone()
        torch.distributed.all_reduce(total)
        return ((local + (total - local.detach())) / self.scale).view(1)


class PartitionedFeatures(FeatureParam):
    """:class:`FeatureParam` of the owned rows of a part: the whole graph's statistics and the
    owned rows of the single process's initial draw; the binary top-rho mask (per R) is the
    distributed selection over all ranks' entries, ties by global position as in one process."""

    def __init__(self, sub: Subgraph, graph, generators: list[torch.Generator], **settings):
        population = whole_graph(graph.x, graph.edge_index, None)
        stats = feature_stats(population)
        noise = draw_noise(torch.tensor([0, graph.num_nodes]), graph.x.shape[1], generators,
                           device=graph.x.device)[sub.node_ids[sub.free]]
        super().__init__(sub, generators, stats=stats, noise=noise, **settings)
        self.component_rows = torch.tensor([graph.num_nodes], device=graph.x.device)
        width = graph.x.shape[1]
        self.position = (sub.node_ids[sub.free].unsqueeze(1) * width
                         + torch.arange(width, device=graph.x.device)).reshape(-1)

    def _top_mask(self, prob: Tensor) -> tuple[Tensor, Tensor]:
        if self.per_row:
            return super()._top_mask(prob)
        selected, threshold = top_k(prob.reshape(-1), self.position, int(self.stats.ones[0]))
        return selected.view_as(prob).to(prob.dtype), threshold.expand(prob.shape[0], 1)


def generate_partitioned(model: nn.Module, graph, layer: str, schedule, seed: int, opts) -> dict:
    """The whole-graph feature metamer of ``graph`` solved by the ranks together.

    Returns the pieces of the complete result, equal on every rank: ``x`` (X' [n, d]),
    ``history`` [steps, 1], ``reference_acts`` / ``metamer_acts`` [n, d_l], ``loss`` (float),
    ``passed`` / ``distance`` [n] and ``null`` of the criterion, ``trivial`` [1], ``seconds`` (the
    optimisation), ``binary``, ``sub`` (the whole graph as a problem, for scoring) and ``partition`` (ranks, order, halo rows and bytes exchanged per forward, per rank)."""
    rank, world = distributed.world()
    weight = getattr(graph, "edge_weight", None)
    part = build_part(graph.edge_index, owners(graph.edge_index, graph.num_nodes, world), rank, world)
    sub = _part_problem(graph, part, weight)
    first = PartitionedEngine(model, layer, sub, part, None, None)
    with torch.no_grad():
        reference = first.activations(sub.x, sub.edge_index, sub.edge_weight)
    whole = _gather_rows(reference, part, graph.num_nodes)
    engine = PartitionedEngine(model, layer, sub, part, reference, loss_scale(whole, joint=True))
    binary = is_binary(graph.x) if opts.binary is None else opts.binary
    if binary and opts.binary is not None and not is_binary(graph.x):
        raise ValueError("binary=True but the reference features are not all 0/1")
    generators = [torch.Generator().manual_seed(seed * 1_000_003)]
    feats = PartitionedFeatures(sub, graph, generators, binary=binary, size_independent=False,
                                per_row=opts.per_row, slope=opts.slope, margin=opts.margin,
                                margin_weight=opts.margin_weight)
    best = BestStates([feats], 1)

    def step_losses() -> tuple[Tensor, Tensor]:
        x, penalty = feats.features()
        return engine.losses(x, sub.edge_index, sub.edge_weight), penalty

    started = time.perf_counter()
    history = run_schedule([feats], step_losses, schedule, 1, progress=opts.progress,
                           stop_below=torch.full((1,), schedule.tol), best=best, sync_every=opts.sync_every)
    seconds = time.perf_counter() - started
    rows = best.dense_states()[0]
    del feats, best
    x = _gather_rows(rows, part, graph.num_nodes)
    with torch.no_grad():
        local_x = sub.x.clone()
        local_x[sub.free] = rows
        metamer_acts = _gather_rows(engine.activations(local_x, sub.edge_index, sub.edge_weight), part,
                                    graph.num_nodes)
    loss = float((metamer_acts.double() - whole.double()).pow(2).sum() / engine.scale.double())
    passed, distance, null = whole_graph_passes(whole, metamer_acts)
    trivial = torch.tensor([bool(torch.equal(x, graph.x))])
    full = whole_graph(graph.x, graph.edge_index, weight)
    return dict(x=x, history=history, seconds=seconds, reference_acts=whole, metamer_acts=metamer_acts, loss=loss,
                passed=passed & ~trivial, distance=distance, null=null, trivial=trivial, binary=binary, sub=full,
                partition={"ranks": world, "order": ORDER,
                           "halo_rows": distributed.all_gather(part.num_halo),
                           "owned_rows": distributed.all_gather(part.num_owned),
                           "exchange_bytes_per_forward": sum(first.traffic)})


def _part_problem(graph, part: Part, weight: Tensor | None) -> Subgraph:
    """The part as a problem graph: the owned rows free and the targets, the rest frozen."""
    m, device = part.nodes.numel(), graph.x.device
    free = torch.zeros(m, dtype=torch.bool, device=device)
    free[:part.num_owned] = True
    return Subgraph(graph.x[part.nodes], part.edge_index, None if weight is None else weight[part.edges], part.nodes,
                    free, torch.zeros(m, dtype=torch.long, device=device),
                    torch.arange(part.num_owned, device=device), 1)


def _gather_rows(rows: Tensor, part: Part, num_nodes: int) -> Tensor:
    """[n, ...] every rank's owned ``rows`` [|O|, ...] put at their global ids, on every rank."""
    counts = distributed.all_gather(part.num_owned)
    width = max(counts)
    block = rows.new_zeros(width, *rows.shape[1:])
    block[:rows.shape[0]] = rows
    blocks = [torch.empty_like(block) for _ in counts]
    torch.distributed.all_gather(blocks, block)
    ids = [torch.empty(width, dtype=torch.long, device=rows.device) for _ in counts]
    mine = torch.zeros(width, dtype=torch.long, device=rows.device)
    mine[:part.num_owned] = part.owned
    torch.distributed.all_gather(ids, mine)
    out = rows.new_empty(num_nodes, *rows.shape[1:])
    for block, index, count in zip(blocks, ids, counts):
        out[index[:count]] = block[:count]
    return out
