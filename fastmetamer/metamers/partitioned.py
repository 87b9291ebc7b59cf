"""A whole-graph feature metamer partitioned across the ranks of a process group (SPEC §10).

Called on every rank with the same arguments, :func:`generate_partitioned` gives each rank a
:class:`~fastmetamer.graph.partition.Part` of the nodes. A rank holds the parameters, Adam
moments and gradient of its owned rows only, and runs the model on its part with the halo
exchanged per layer (:mod:`fastmetamer.distributed.halo`): the lowered program on the fast
engine where the model lowers, else the model itself (plain autograd) with hooks.
The loss is an ``all_reduce`` of the ranks' squared errors over the global ||H||^2, the binary
top-rho selection a distributed selection (:mod:`fastmetamer.distributed.select`); the feature
statistics and the initial draw are the single process's (each rank keeps its rows), so the
optimisation is the one a single process runs, up to float rounding. At the end the ranks
exchange their best rows and activations; each rank decides the pass criterion for its own
nodes (against every node), and every rank scores and returns the complete result.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import Tensor, nn

from .. import distributed
from ..distributed.halo import exchanging
from ..distributed.select import top_k
from ..distributed.halo import exchange
from ..engines import FastEngine, Unsupported, loss_scale, lower
from ..engines.lowering import Program
from ..ops import dispatch
from ..graph.layers import layer_output
from ..graph.partition import Part, build_part, owners
from ..graph.subgraph import Subgraph, whole_graph
from ..validation import is_binary
from .criterion import NullDistances, whole_graph_passes
from .features import FeatureParam, FeatureStats, FusedBinaryFeatures, draw_noise, feature_stats
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
    if opts.refine_steps:
        return "refine_steps (the swap search is not partitioned)"
    return None


class PartitionedEngine:
    """The reference engine on one rank's part: the model's own forward (autograd) with the halo
    exchanged per layer by hooks. :meth:`activations` gives the owned rows [|O|, d_l] and
    :meth:`losses` the global L_act = sum_ranks ||H'_O - H_O||^2 / ||H||^2 [1], whose gradient on
    each rank is its share (the exchanges' backward delivers the rest). Every rank calls them
    together; :meth:`set_target` gives the reference once it is known.

    Args:
        model, layer: the model and the matched layer.
        sub: the part as a problem graph (owned rows free and the targets).
        part: the partition (exchange plan).
    """

    name = "reference"

    def __init__(self, model: nn.Module, layer: str, sub: Subgraph, part: Part):
        self.model, self.layer, self.sub, self.part = model, layer, sub, part
        self.target = self.scale = None
        self.traffic: list[int] = []

    def set_target(self, target: Tensor, scale: Tensor) -> None:
        """The reference activations of the owned rows [|O|, d_l] and ||H||^2 of every node [1]."""
        self.target, self.scale = target, scale

    def activations(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        with exchanging(self.model, self.part, self.traffic):
            out = layer_output(self.model, self.layer, x, edge_index, edge_weight)
        return out[self.sub.center]

    def losses(self, x, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        local = (self.activations(x, edge_index, edge_weight) - self.target).pow(2).sum()
        return _global_loss(local / self.scale)


class PartitionedFastEngine(FastEngine):
    """:class:`PartitionedEngine`'s interface on the fast engine: the lowered program runs over
    every row of the part, and each stage receives its halo rows right after its dense transform
    (x W, node-wise, so exchanging it equals exchanging x, and it is narrower than x on the first
    layer); only the owned rows count in the loss."""

    def __init__(self, program: Program, backend: str, model: nn.Module, sub: Subgraph, part: Part):
        every_row = dataclasses.replace(sub, center=torch.arange(sub.num_nodes, device=sub.x.device))
        super().__init__(program, backend, model, every_row, sub.x.new_zeros(sub.num_nodes, 1), joint=True)
        self.part, self.owned = part, part.num_owned
        self.traffic: list[int] = []

    def set_target(self, target: Tensor, scale: Tensor) -> None:
        """See :meth:`PartitionedEngine.set_target`; the other rows form a second problem that the
        loss ignores."""
        m = self.sub.num_nodes
        self.target = torch.cat([target, target.new_zeros(m - self.owned, target.shape[1])]).contiguous()
        self.component = (torch.arange(m, device=target.device) >= self.owned).long()
        self.scale = torch.cat([scale.view(1), scale.new_ones(1)])

    def activations(self, x, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        return super().activations(x, edge_index, edge_weight)[:self.owned]

    def losses(self, x, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        return _global_loss(super().losses(x, edge_index, edge_weight)[0])

    def _exchanged(self, inputs: Tensor, stage) -> Tensor:
        m = self.sub.num_nodes
        if self.traffic is not None:
            self.traffic.append(self.part.world * self.part.width * inputs[:1].numel() * inputs.element_size())
        if inputs.shape[0] == 2 * m:  # [x W; x W_root] of a stage with a root weight
            return torch.cat([exchange(inputs[:m], self.part), exchange(inputs[m:], self.part)])
        return exchange(inputs, self.part)


def _global_loss(local: Tensor) -> Tensor:
    """[1] the sum of every rank's ``local`` (a scalar), differentiable w.r.t. this rank's."""
    total = local.detach().clone()
    torch.distributed.all_reduce(total)
    return (local + (total - local.detach())).view(1)


def _make_engine(model: nn.Module, layer: str, sub: Subgraph, part: Part, backend: str):
    """The fast engine where the model lowers (and ``backend`` is not the reference), else the
    reference engine with hooks."""
    concrete = dispatch.resolve(backend, sub.x.device)
    if concrete != "reference":
        try:
            return PartitionedFastEngine(lower(model, layer), concrete, model, sub, part)
        except Unsupported:
            pass
    return PartitionedEngine(model, layer, sub, part)


class PartitionedFeatures(FeatureParam):
    """:class:`FeatureParam` of the owned rows of a part: the whole graph's statistics and the
    owned rows of the single process's initial draw; the binary top-rho mask (per R) is the
    distributed selection over all ranks' entries, ties by global position as in one process."""

    def __init__(self, sub: Subgraph, graph, generators: list[torch.Generator], **settings):
        stats, noise = _whole_graph_start(sub, graph, generators)
        super().__init__(sub, generators, stats=stats, noise=noise, **settings)
        self.component_rows = torch.tensor([graph.num_nodes], device=graph.x.device)

    def _top_mask(self, prob: Tensor) -> tuple[Tensor, Tensor]:
        if self.per_row:
            return super()._top_mask(prob)
        selected, threshold = top_k(prob, self.sub.node_ids[self.sub.free], int(self.stats.ones[0]))
        hard = torch.zeros_like(prob).view(-1).index_fill_(0, selected, 1.0).view_as(prob)
        return hard, threshold.expand(prob.shape[0], 1)


class PartitionedFusedFeatures(FusedBinaryFeatures):
    """:class:`FusedBinaryFeatures` of the owned rows of a part (see :class:`PartitionedFeatures`):
    the fused update runs on the owned rows; the top-rho selection per R is the distributed one."""

    def __init__(self, sub: Subgraph, graph, generators: list[torch.Generator], kernels, schedule, **settings):
        stats, noise = _whole_graph_start(sub, graph, generators)
        super().__init__(sub, generators, kernels, schedule, stats=stats, noise=noise,
                         component_rows=torch.tensor([graph.num_nodes], device=graph.x.device), **settings)
        self.per_row = settings["per_row"]

    def _select(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.per_row:
            return super()._select()
        rows, width = self.theta.shape
        selected, threshold = top_k(self.theta, self.sub.node_ids[self.sub.free], int(self.k[0]),
                                    score=lambda theta: torch.sigmoid(self.slope * theta))
        counts = torch.bincount(torch.div(selected, width, rounding_mode="floor"), minlength=rows)
        rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return rowptr, selected % width, threshold.expand(rows).contiguous()


def _whole_graph_start(sub: Subgraph, graph, generators: list[torch.Generator]) -> tuple[FeatureStats, Tensor]:
    """The whole graph's feature statistics and the owned rows [|O|, d] of the single process's
    initial draw (drawn whole, then cut)."""
    stats = feature_stats(whole_graph(graph.x, graph.edge_index, None))
    noise = draw_noise(torch.tensor([0, graph.num_nodes]), graph.x.shape[1], generators, device=graph.x.device)
    return stats, noise[sub.node_ids[sub.free]]


def generate_partitioned(model: nn.Module, graph, layer: str, schedule, seed: int, backend: str, opts) -> dict:
    """The whole-graph feature metamer of ``graph`` solved by the ranks together.

    Returns the pieces of the complete result, equal on every rank: ``x`` (X' [n, d]),
    ``history`` [steps, 1], ``reference_acts`` / ``metamer_acts`` [n, d_l], ``loss`` (float),
    ``passed`` / ``distance`` [n] and ``null`` of the criterion, ``trivial`` [1], ``seconds`` (the
    optimisation), ``binary``, ``backend`` (the engine's), ``sub`` (the whole graph as a problem,
    for scoring) and ``partition`` (ranks, order, halo and owned rows per rank, bytes exchanged
    per forward)."""
    rank, world = distributed.world()
    weight = getattr(graph, "edge_weight", None)
    part = build_part(graph.edge_index, owners(graph.edge_index, graph.num_nodes, world), rank, world)
    sub = _part_problem(graph, part, weight)
    engine = _make_engine(model, layer, sub, part, backend)
    with torch.no_grad():
        reference = engine.activations(sub.x, sub.edge_index, sub.edge_weight)
    exchange_bytes, engine.traffic = sum(engine.traffic), None
    whole = _gather_rows(reference, part, graph.num_nodes)
    scale = loss_scale(whole, joint=True)
    engine.set_target(reference, scale)
    binary = is_binary(graph.x) if opts.binary is None else opts.binary
    if binary and opts.binary is not None and not is_binary(graph.x):
        raise ValueError("binary=True but the reference features are not all 0/1")
    generators = [torch.Generator().manual_seed(seed * 1_000_003)]
    settings = dict(per_row=opts.per_row, slope=opts.slope, margin=opts.margin, margin_weight=opts.margin_weight)
    if binary and isinstance(engine, FastEngine):
        feats = PartitionedFusedFeatures(sub, graph, generators, dispatch.get("update", engine.name), schedule,
                                         **settings)
    else:
        feats = PartitionedFeatures(sub, graph, generators, binary=binary, size_independent=False, **settings)
    best = BestStates([feats], 1)

    def step_losses() -> tuple[Tensor, Tensor]:
        x, penalty = feats.features()
        return engine.losses(x, sub.edge_index, sub.edge_weight), penalty

    started = time.perf_counter()
    stop_below = torch.full((1,), schedule.tol, device=graph.x.device)
    history = run_schedule([feats], step_losses, schedule, 1, progress=opts.progress, stop_below=stop_below,
                           best=best, sync_every=opts.sync_every)
    seconds = time.perf_counter() - started
    rows = best.dense_states()[0]
    del feats, best
    x = _gather_rows(rows, part, graph.num_nodes)
    with torch.no_grad():
        local_x = sub.x.clone()
        local_x[sub.free] = rows
        metamer_acts = _gather_rows(engine.activations(local_x, sub.edge_index, sub.edge_weight), part,
                                    graph.num_nodes)
    loss = float((metamer_acts.double() - whole.double()).pow(2).sum() / scale.double())
    passed, distance, null = _shared_criterion(whole, metamer_acts, part)
    trivial = torch.tensor([bool(torch.equal(x, graph.x))], device=graph.x.device)
    full = whole_graph(graph.x, graph.edge_index, weight)
    return dict(x=x, history=history, seconds=seconds, reference_acts=whole, metamer_acts=metamer_acts, loss=loss,
                passed=passed & ~trivial, distance=distance, null=null, trivial=trivial, binary=binary, sub=full,
                backend=engine.name,
                partition={"ranks": world, "order": ORDER,
                           "halo_rows": distributed.all_gather(part.num_halo),
                           "owned_rows": torch.bincount(part.owner, minlength=world).tolist(),
                           "exchange_bytes_per_forward": exchange_bytes})


def _shared_criterion(whole: Tensor, metamer_acts: Tensor, part: Part) -> tuple[Tensor, Tensor, NullDistances]:
    """The whole-graph criterion (every node against every node), each rank deciding its owned
    nodes; the flags, distances and certificates of all n nodes on every rank."""
    passed, distance, null = whole_graph_passes(whole, metamer_acts, queries=part.owned)
    n = whole.shape[0]
    return (_gather_rows(passed.to(torch.uint8), part, n).bool(), _gather_rows(distance, part, n),
            NullDistances(_gather_rows(null.threshold, part, n), _gather_rows(null.twins, part, n)))


def _part_problem(graph, part: Part, weight: Tensor | None) -> Subgraph:
    """The part as a problem graph: the owned rows free and the targets, the rest frozen."""
    m, device = part.nodes.numel(), graph.x.device
    free = torch.zeros(m, dtype=torch.bool, device=device)
    free[:part.num_owned] = True
    return Subgraph(graph.x[part.nodes], part.edge_index, None if weight is None else weight[part.edges], part.nodes,
                    free, torch.zeros(m, dtype=torch.long, device=device),
                    torch.arange(part.num_owned, device=device), 1)


def _gather_rows(rows: Tensor, part: Part, num_nodes: int) -> Tensor:
    """[n, ...] every rank's owned ``rows`` [|O|, ...] (in id order) put at their global ids, on every
    rank: one ``all_gather`` of blocks padded to the largest part (the ids follow from ``part.owner``)."""
    counts = torch.bincount(part.owner, minlength=part.world).tolist()
    block = rows.new_zeros(max(counts), *rows.shape[1:])
    block[:rows.shape[0]] = rows
    blocks = [torch.empty_like(block) for _ in counts]
    torch.distributed.all_gather(blocks, block)
    out = rows.new_empty(num_nodes, *rows.shape[1:])
    out[part.ids_by_owner] = torch.cat([block[:count] for block, count in zip(blocks, counts)])
    return out
