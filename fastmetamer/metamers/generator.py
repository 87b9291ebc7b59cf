"""``fastmetamer.generate``: feature, structure and joint metamers (SPEC §2, §8)."""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from ..validation import (check_feature_width, check_forward_kwargs, check_graph, check_hops, check_nodes,
                          is_binary, model_input)
from ..engines import FastEngine, full_graph_activations, loss_scale, make_engine
from ..ops import dispatch
from .criterion import NullDistances, null_distances, passes, whole_graph_passes
from .features import FeatureParam, FusedBinaryFeatures
from ..graph.kwargs import ForwardKwargs
from ..graph.layers import accepts_keyword, count_hops, layer_output, resolve_layer
from .moves import FeatureMoves, StructureMoves
from .optimize import BestStates, Restarts, Schedule, run_schedule
from .refine import refine
from . import chunks, partitioned
from .. import distributed
from ..memory import check_budget, default_budget
from ..graph.subgraph import (Subgraph, check_graph_ids, disjoint_receptive_fields, receptive_field,
                              whole_graph)
from .scoring import metamer_metrics
from .result import MetamerResult
from .structure import StructureParam

KINDS = ("features", "structure", "joint")
DEFAULT_STEPS = {"features": 1000, "structure": 400, "joint": 1000}
DEFAULT_LR = {"features": 0.1, "structure": 0.1, "joint": 0.1}


@dataclass
class Options:
    """Keyword options of :func:`generate` beyond the named arguments.

    binary: force binary (True) / continuous (False) features; None detects 0/1 references.
    per_row: binary top-rho per node (keep each node's number of ones) instead of per R.
    size_independent: learn only per-feature mean and std (parameters independent of |R|).
    slope, margin, margin_weight: sigmoid slope s; margin m and weight lambda of the margin term.
    edge_slope: sigmoid slope for edge logits.
    stages: learning-rate halving stages; tol: early-stop tolerance on L_act per target (a node
        target also stops only once its loss is below half the loss that passes the criterion).
    restart_patience: a node target's feature metamer that has not improved by 1% for this many
        steps while failing the null criterion or above ``restart_above`` restarts from a new
        draw, keeping its best state; the swap search likewise starts once more from a random
        state when it ends there (None: never restart).
    refine_steps: iterations of the discrete swap search that follows the straight-through phase
        for binary features and structure (each keeps the budget; 0 turns it off). None (default):
        200 for independent problems (node targets, graphs of a batch, one pooled graph), 0 for a
        whole-graph metamer of node activations, whose one loss over every node a single swap
        barely moves while each candidate costs a pass over the whole graph (give it explicitly
        to search there too);
        refine_kicks: random restarts of a problem's search when no move improves it.
    hops: receptive-field radius override (default: counted from the model's propagate calls).
    dense_max_nodes, block_size, resample_every: structure candidate settings.
    null_sample: None (default) makes the null set every real node of the graph (exact, SPEC
        §2.3); an int k makes it k random real nodes (seeded) instead, and the result's
        ``settings["null_sample"]`` says so.
    memory_budget: bytes that a list of node targets may use at once; the targets are solved
        in consecutive chunks whose estimated memory fits it (see :mod:`.chunks`) and the
        result is the one a single call over all of them gives. None (default): a quarter of
        the memory available at the call, at most 2 GiB.
    null_graphs: for a graph-level (pooled) layer, other real graphs whose embeddings form the
        null distribution of the success criterion (without them nothing passes).
    scores: compute ``res.metrics`` (distances and consistency; False leaves it empty).
    progress: tqdm bar (None: only on a terminal).
    sync_every: steps between the host's reads of the optimiser's device flags (early stop,
        restarts; None: every step on the CPU, 16 on a GPU, see :mod:`.optimize`).
    forward_kwargs: extra keyword arguments of the model's forward (e.g. ``{"edge_attr": ...}``),
        passed to every model call; per-node [n, ...] and per-edge [E, ...] tensors are sliced to
        each receptive field (see :mod:`fastmetamer.graph.kwargs`); per-edge ones only with
        kind="features" (structure metamers change the edges).
    """

    binary: bool | None = None
    per_row: bool = False
    size_independent: bool = False
    slope: float = 1.0
    margin: float = 0.05
    margin_weight: float = 0.1
    edge_slope: float = 1.0
    stages: int = 4
    tol: float = 1e-5
    restart_patience: int | None = 100
    restart_above: float = 1e-3
    refine_steps: int | None = None
    refine_kicks: int = 4
    hops: int | None = None
    dense_max_nodes: int = 400
    block_size: int | None = None
    resample_every: int = 50
    null_sample: int | None = None
    null_graphs: list | None = None
    memory_budget: int | None = None
    scores: bool = True
    progress: bool | None = None
    sync_every: int | None = None
    forward_kwargs: dict | None = None

    @classmethod
    def from_kwargs(cls, options: dict) -> "Options":
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; allowed options: {allowed}")
        return cls(**options)


def generate(model: nn.Module, graph: Data, node: int | list[int] | Tensor | None, *,
             layer: str | int | None = None, kind: str = "features", steps: int | None = None,
             lr: float | None = None, seed: int | None = None, backend: str = "auto",
             **options) -> MetamerResult:
    """Generate a model metamer: inputs that ``model`` represents at ``layer`` like the reference.

    Args:
        model: a trained module called as ``model(x, edge_index[, edge_weight])``.
        graph: the reference graph (``x`` [n, d], ``edge_index`` [2, E], optional ``edge_weight``).
        node: a target node id, a list of ids (independent problems batched as a disjoint union
            of receptive fields), or None (all nodes jointly, one shared X'; with a pooled
            graph-level layer such as a zoo model's ``"readout"``, the graph embedding, and for
            a PyG ``Batch`` of graphs, one independent metamer per graph, solved together; each
            gets the metamer a call on its graph alone would give).
        layer: module name or index among message-passing layers (default: the last one).
        kind: ``"features"``, ``"structure"`` or ``"joint"``.
        steps: optimisation steps in total (default by kind); lr: initial Adam learning rate.
        seed: seeds the initialisation (default 0); each target draws from its own generator,
            so a batched target gets the same metamer as a single call.
        backend: engine backend; ``"auto"`` picks the fastest available.
        **options: see :class:`Options`.

    Returns:
        a :class:`MetamerResult`.
    """
    check_graph(graph)
    targets = check_nodes(node, graph.num_nodes, graph.x.device)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {list(KINDS)}")
    opts = Options.from_kwargs(options)
    opts.hops = check_hops(opts.hops)
    if opts.null_sample is not None and (isinstance(opts.null_sample, bool) or not isinstance(opts.null_sample, int)
                                         or opts.null_sample < 1):
        raise ValueError(f"null_sample must be None (every node) or a positive int, got {opts.null_sample!r}")
    check_budget(opts.memory_budget)
    schedule = _schedule(kind, steps, lr, opts)
    layer_name = resolve_layer(model, layer)
    source, graph = graph, model_input(model, graph)
    extra = ForwardKwargs.split(opts.forward_kwargs, graph.num_nodes, graph.num_edges)
    check_forward_kwargs(extra, kind, graph.x.device)
    with _frozen(model):
        check_feature_width(model, layer_name, graph.x, extra)
        result = _generate_in_chunks(model, graph, targets, layer_name, kind, schedule, 0 if seed is None else seed,
                                     backend, opts, extra)
    result.input_graph = source
    return result


def _schedule(kind: str, steps: int | None, lr: float | None, opts: Options) -> Schedule:
    steps = DEFAULT_STEPS[kind] if steps is None else steps
    lr = DEFAULT_LR[kind] if lr is None else lr
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if opts.stages < 1:
        raise ValueError(f"stages must be >= 1, got {opts.stages}")
    return Schedule(steps=steps, stages=opts.stages, lr=float(lr), tol=opts.tol)


@contextmanager
def _frozen(model: nn.Module):
    """Eval mode and no parameter gradients for the duration; restored afterwards."""
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)


def _generate_in_chunks(model, graph, targets, layer, kind, schedule, seed, backend, opts, extra) -> MetamerResult:
    """:func:`_generate` over consecutive chunks of a list of node targets that fit the memory
    budget, merged (one call when they all fit, or for one target or a whole graph). Inside a
    process group of several ranks, each rank solves its share of the targets and every rank
    returns the merged result (:mod:`fastmetamer.distributed`)."""
    hops = count_hops(model, layer, graph.x, extra) if opts.hops is None else opts.hops
    if targets is None and distributed.is_sharing() and _shareable_batch(graph, extra):
        return _shared_graphs(model, graph, layer, kind, schedule, seed, backend, opts, extra, hops)
    if targets is None and distributed.is_sharing():
        reason = partitioned.not_partitioned(model, layer, graph, kind, opts, extra)
        if reason is None:
            return _partitioned(model, graph, layer, kind, schedule, seed, backend, opts, hops)
        warnings.warn(f"fastmetamer: a whole-graph problem with {reason} is not partitioned; every rank "
                      "solves all of it", stacklevel=4)
    if targets is None or targets.numel() == 1:
        return _generate(model, graph, targets, layer, kind, schedule, seed, backend, opts, extra, hops)
    budget = default_budget(graph.x.device) if opts.memory_budget is None else opts.memory_budget
    costs = chunks.problem_bytes(graph, targets, hops + _context(kind, hops))
    if distributed.is_sharing():
        mine = distributed.my_share(costs)
        part = None if mine.start == mine.stop else \
            _solve_chunks(model, graph, targets[mine], costs[mine], budget, layer, kind, schedule, seed, backend,
                          opts, extra, hops)
        return _merged_parts(part, graph)
    parts = chunks.split_targets(costs, targets, budget)
    if len(parts) == 1:
        return _generate(model, graph, targets, layer, kind, schedule, seed, backend, opts, extra, hops)
    return chunks.with_copied_rows(_solve_chunks(model, graph, targets, costs, budget, layer, kind, schedule, seed,
                                                 backend, opts, extra, hops), graph)


def _shareable_batch(graph, extra) -> bool:
    """Whether ``graph`` is a batch of at least two graphs whose graphs can be shared out (no
    forward_kwargs to cut per graph)."""
    batch = getattr(graph, "batch", None)
    return batch is not None and not extra and check_graph_ids(batch, graph.num_nodes) > 1


def _shared_graphs(model, graph, layer, kind, schedule, seed, backend, opts, extra, hops) -> MetamerResult:
    """A batch of graphs inside a process group: each rank solves a run of consecutive graphs
    (balanced by nodes plus edges) as a batch of its own and the ranks exchange their results.
    Each graph draws from its own random stream as if alone, so the merged result is the one
    one process returns."""
    batch, device = graph.batch, graph.x.device
    num_graphs = int(batch[-1]) + 1
    starts = torch.cat([batch.new_zeros(1), torch.bincount(batch, minlength=num_graphs).cumsum(0)])
    costs = torch.bincount(batch, minlength=num_graphs) + torch.bincount(batch[graph.edge_index[1]],
                                                                         minlength=num_graphs)
    mine = distributed.my_share(costs)
    part = None
    if mine.start < mine.stop:
        first, last = int(starts[mine.start]), int(starts[mine.stop])
        part = _generate(model, _graphs_between(graph, first, last, mine.start), None, layer, kind, schedule, seed,
                         backend, opts, extra, hops)
        _as_batch_part(part, first)
        chunks.without_copied_rows(part)
    return _merged_parts(part, graph)


def _merged_parts(part: MetamerResult | None, graph: Data) -> MetamerResult:
    """Every rank's ``part`` (without its copied rows, or None where a rank had nothing to
    solve) merged in rank order, with the rows copied from ``graph`` put back."""
    return chunks.with_copied_rows(chunks.merge_results([r for r in distributed.all_gather(part) if r is not None]),
                                   graph)


def _graphs_between(graph, first: int, last: int, first_graph: int) -> Data:
    """The graphs of ``graph`` (a batch) whose nodes are ``first:last``, as a batch of their own."""
    inside = (graph.edge_index[1] >= first) & (graph.edge_index[1] < last)
    part = Data(x=graph.x[first:last], edge_index=graph.edge_index[:, inside] - first,
                batch=graph.batch[first:last] - first_graph)
    weight = getattr(graph, "edge_weight", None)
    if weight is not None:
        part.edge_weight = weight[inside]
    return part


def _as_batch_part(result: MetamerResult, first: int) -> None:
    """A part's result as one chunk of the whole batch's: node ids shifted by ``first`` (the
    part's first node) and per-graph outputs kept per graph when the part holds one graph."""
    for data in (result.graph, result.reference):
        data.n_id = data.n_id + first
    if not isinstance(result.loss, Tensor):
        result.loss = torch.tensor([result.loss])
        result.history = result.history.unsqueeze(1)


def _partitioned(model, graph, layer, kind, schedule, seed, backend, opts, hops) -> MetamerResult:
    """A whole-graph feature metamer solved by the ranks of the process group together, each on
    its part of the nodes (:mod:`.partitioned`); the complete result on every rank."""
    pieces = partitioned.generate_partitioned(model, graph, layer, schedule, seed, backend, opts)
    sub, history = pieces["sub"], pieces["history"]
    metamer = _subgraph_data(sub, graph, pieces["x"], sub.edge_index, sub.edge_weight)
    reference = _subgraph_data(sub, graph, sub.x, sub.edge_index, sub.edge_weight)
    passed, null = pieces["passed"], pieces["null"]
    return MetamerResult(
        graph=metamer, reference=reference, center=sub.center, loss=pieces["loss"], history=history[:, 0],
        passed=passed, trivial=pieces["trivial"].expand(graph.num_nodes), distance=pieces["distance"],
        null_threshold=null.threshold, twins=null.twins,
        metrics=metamer_metrics(metamer, reference, sub, pieces["metamer_acts"], pieces["reference_acts"], kind,
                                passed) if opts.scores else {},
        kind=kind, layer=layer, hops=hops, nodes=None, seconds=pieces["seconds"],
        settings={**asdict(opts), "null_graphs": None, "forward_kwargs": [], "steps": schedule.steps,
                  "lr": schedule.lr, "seed": seed, "backend": pieces["backend"], "binary": pieces["binary"],
                  "partition": pieces["partition"]},
        gradient_steps=history.shape[0])


def _solve_chunks(model, graph, targets, costs, budget, layer, kind, schedule, seed, backend, opts, extra,
                  hops) -> MetamerResult:
    """The targets [T] (estimated bytes ``costs`` [T]) in chunks within ``budget``, merged
    without the rows copied from ``graph`` (:func:`~.chunks.without_copied_rows`)."""
    return chunks.merge_results([
        chunks.without_copied_rows(_generate(model, graph, part, layer, kind, schedule, seed, backend, opts, extra,
                                             hops, single=False))
        for part in chunks.split_targets(costs, targets, budget)])


def _generate(model, graph, targets, layer, kind, schedule, seed, backend, opts, extra, hops,
              single: bool | None = None) -> MetamerResult:
    """One batch of problems. ``single`` (default: exactly one target node) returns that
    target's outputs as scalars."""
    weight, device = getattr(graph, "edge_weight", None), graph.x.device
    single = targets is not None and targets.numel() == 1 if single is None else single
    if targets is None:
        sub = whole_graph(graph.x, graph.edge_index, weight, forward_kwargs=extra)
    elif single:
        sub = receptive_field(graph.x, graph.edge_index, weight, targets, hops, extra,
                              context=_context(kind, hops))
    else:
        sub = disjoint_receptive_fields(graph.x, graph.edge_index, weight, targets, hops, extra,
                                        context=_context(kind, hops))
    graph_ids = getattr(graph, "batch", None) if targets is None else None
    if graph_ids is not None:
        check_graph_ids(graph_ids, graph.num_nodes)
    whole = None  # the layer's activations of every node of the graph, where the criterion needs them
    if targets is None and graph_ids is None:  # the whole graph: the pass the criterion reuses
        reference_out = whole = full_graph_activations(model, layer, graph, extra, backend)
    elif targets is not None and opts.null_sample is None:  # node targets: their rows of that pass
        whole = full_graph_activations(model, layer, graph, extra, backend)
        if whole.shape[0] != graph.num_nodes:
            raise ValueError(f"layer {layer!r} is graph-level (pooled); use node=None")
        reference_out = None
    else:
        with torch.no_grad():
            reference_out = layer_output(model, layer, sub.x, sub.edge_index, sub.edge_weight, batch=graph_ids,
                                         forward_kwargs=sub.forward_kwargs)
    if reference_out is not None and reference_out.shape[0] != sub.num_nodes:  # a pooled, graph-level layer
        if targets is not None:
            raise ValueError(f"layer {layer!r} is graph-level (pooled); use node=None")
        if graph_ids is not None:
            sub = whole_graph(graph.x, graph.edge_index, weight, batch=graph_ids, forward_kwargs=extra)
            _check_pooled_per_graph(reference_out, sub.num_components, layer)
        elif accepts_keyword(model, "batch"):  # pooled per graph, so copies of it can be pooled apart
            sub.pool_batch = torch.zeros(sub.num_nodes, dtype=torch.long, device=device)
        sub.center = torch.arange(reference_out.shape[0], device=device)
        null = _graph_null(model, layer, reference_out, opts.null_graphs, extra)
        target_ids = torch.zeros(sub.num_components, dtype=torch.long, device=device)  # each graph draws as if alone
    else:
        target_ids = sub.node_ids[sub.center]
        null = None
    reference_acts = reference_out[sub.center] if reference_out is not None else whole[target_ids]
    joint = targets is None and sub.num_components == 1
    engine = make_engine(backend, model, layer, sub, reference_acts, joint=joint)
    if targets is not None and whole is not None:  # the receptive fields must reproduce the pass
        _check_exact(reference_acts, _target_activations(engine, model, layer, sub), layer, hops)
        null = null_distances(whole, torch.arange(graph.num_nodes, device=device), target_ids, reference_acts)
    elif targets is not None:
        null = _sampled_null(model, layer, graph, target_ids, reference_acts, hops, opts, seed, extra)
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + v) for v in
                  (target_ids[:1] if joint else target_ids).tolist()]
    feats, struct = _parameterise(kind, model, layer, sub, graph, generators, opts, engine, schedule)
    pass_loss = None if targets is None else _pass_loss(null, reference_acts)
    stop_below = torch.full((sub.num_components,), schedule.tol, device=device) if pass_loss is None else \
        torch.clamp(0.5 * pass_loss, max=schedule.tol)
    param_sets = [p for p in (feats, struct) if p is not None]
    best = BestStates(param_sets, sub.num_components, device)
    started = time.perf_counter()
    history = run_schedule(
        param_sets, lambda: _step_losses(engine, sub, feats, struct), schedule, sub.num_components,
        progress=opts.progress,
        after_step=None if struct is None else struct.maybe_resample,
        restarts=_restarts(kind, targets, pass_loss, opts), stop_below=stop_below, best=best,
        sync_every=opts.sync_every)
    shared_loss = joint and reference_acts.shape[0] > 1  # one loss over many targets
    copyable = not shared_loss and (sub.pool_batch is not None or reference_out is None
                                    or reference_out.shape[0] == sub.num_nodes)
    restart_above = None if opts.restart_patience is None else torch.full_like(stop_below, opts.restart_above) \
        if pass_loss is None else torch.clamp(pass_loss, max=opts.restart_above)
    states, refined = _refine(engine, sub, feats, struct, best, generators, stop_below, restart_above, opts,
                              shared_loss, copyable)
    gradient_steps = history.shape[0]
    history = torch.cat([history, refined])
    seconds = time.perf_counter() - started
    metamer = _metamer_graph(sub, graph, struct, states)
    with torch.no_grad():
        metamer_acts = engine.activations(metamer.x, metamer.edge_index, metamer.edge_weight)
        final_loss = engine.losses(metamer.x, metamer.edge_index, metamer.edge_weight)
    if null is None:  # every node of a whole graph: a range query, not all nearest neighbours
        passed, distance, null = whole_graph_passes(reference_acts, metamer_acts)
    else:
        passed, distance = passes(metamer_acts, reference_acts, null)
    trivial = _unchanged(sub, struct, states)
    if trivial.numel() != passed.numel():  # a whole graph: its nodes share the one problem
        trivial = trivial[sub.component[sub.center]]
    passed &= ~trivial
    backend_name, binary = engine.name, None if feats is None else feats.binary
    # the optimiser's state (parameters, Adam moments, sparse patterns) is not needed for scoring
    del engine, feats, struct, best, param_sets, states
    reference = _subgraph_data(sub, graph, sub.x, sub.edge_index, sub.edge_weight)
    return MetamerResult(
        graph=metamer, reference=reference,
        center=int(sub.center[0]) if single else sub.center,
        loss=float(final_loss[0]) if final_loss.numel() == 1 and (single or targets is None) else final_loss,
        history=history[:, 0] if history.shape[1] == 1 and (single or targets is None) else history,
        passed=bool(passed[0]) if single else passed,
        trivial=bool(trivial[0]) if single else trivial,
        distance=distance, null_threshold=null.threshold, twins=null.twins,
        metrics=metamer_metrics(metamer, reference, sub, metamer_acts, reference_acts, kind,
                                passed & ~trivial) if opts.scores else {},
        kind=kind, layer=layer, hops=hops, nodes=None if targets is None else targets.tolist(),
        seconds=seconds, settings={**asdict(opts), "null_graphs": _count(opts.null_graphs),
                                   "forward_kwargs": sorted(opts.forward_kwargs or {}),
                                   "steps": schedule.steps, "lr": schedule.lr,
                                   "seed": seed, "backend": backend_name, "binary": binary},
        gradient_steps=gradient_steps)


def _context(kind: str, hops: int) -> int:
    """Frozen hops kept beyond R: rewired edges among R bring R's surroundings up to hops - 1
    beyond it within reach of the target (see :func:`~fastmetamer.graph.subgraph.receptive_field`)."""
    return 0 if kind == "features" else max(hops - 1, 0)


def _count(graphs) -> int | None:
    """How many null graphs were given (results keep the count, not the graphs)."""
    return None if graphs is None else len(graphs)


def _sampled_null(model, layer, graph, target_ids, reference_acts, hops, opts, seed, extra):
    """Null distances of the targets from ``opts.null_sample`` random real nodes (their
    activations from their own receptive fields), as asked for instead of every node."""
    weight = getattr(graph, "edge_weight", None)
    gen = torch.Generator().manual_seed(seed)
    null_ids = torch.randperm(graph.num_nodes, generator=gen)[: opts.null_sample].to(graph.x.device)
    part = receptive_field(graph.x, graph.edge_index, weight, null_ids, hops, extra)
    with torch.no_grad():
        null_acts = layer_output(model, layer, part.x, part.edge_index, part.edge_weight,
                                 forward_kwargs=part.forward_kwargs)[part.center]
    return null_distances(null_acts, null_ids, target_ids, reference_acts)


def _target_activations(engine, model, layer, sub: Subgraph) -> Tensor:
    """The layer's activations [T, d_l] at the targets computed on the problem graph ``sub``: by the
    fast engine's rows that reach them, else by the model's forward."""
    if isinstance(engine, FastEngine):
        return engine.activations(sub.x, sub.edge_index, sub.edge_weight)
    with torch.no_grad():
        return layer_output(model, layer, sub.x, sub.edge_index, sub.edge_weight,
                            forward_kwargs=sub.forward_kwargs)[sub.center]


def _pass_loss(null: NullDistances, reference_acts: Tensor) -> Tensor:
    """[T] the L_act below which each target passes: threshold^2 / ||h||^2."""
    return (null.threshold.double().pow(2) / loss_scale(reference_acts.double(), joint=False)).float()


def _restarts(kind, targets, pass_loss, opts) -> Restarts | None:
    """Restarts for node-target feature metamers: a target stalls unless it passes and its loss
    is below ``restart_above``."""
    if kind != "features" or targets is None or opts.restart_patience is None:
        return None
    return Restarts(torch.clamp(pass_loss, max=opts.restart_above), opts.restart_patience)


def _check_pooled_per_graph(reference_out: Tensor, num_graphs: int, layer: str) -> None:
    if reference_out.shape[0] != num_graphs:
        raise ValueError(
            f"layer {layer!r} pooled the batch of {num_graphs} graphs into {reference_out.shape[0]} "
            "embeddings: the model must take batch= (graph ids) to pool each graph on its own")


def _graph_null(model, layer, reference_acts, null_graphs, extra):
    """Null distances of graph-level embeddings [G, d] from those of ``null_graphs`` (other
    real graphs); with none given the criterion cannot be evaluated and nothing passes."""
    if not null_graphs:
        return NullDistances(torch.full_like(reference_acts[:, 0], float("nan")),
                             torch.zeros(reference_acts.shape[0], dtype=torch.long, device=reference_acts.device))
    batch = Batch.from_data_list(list(null_graphs)).to(reference_acts.device)
    with torch.no_grad():
        acts = layer_output(model, layer, batch.x, batch.edge_index, getattr(batch, "edge_weight", None),
                            batch=batch.batch, forward_kwargs=extra.of_graph(batch))
    no_self = torch.full((reference_acts.shape[0],), -1, device=acts.device)  # the targets are not null graphs
    return null_distances(acts, torch.arange(acts.shape[0], device=acts.device), no_self, reference_acts)


def _check_exact(full: Tensor, sub: Tensor, layer: str, hops: int) -> None:
    scale = full.abs().max().clamp_min(1.0)
    if not torch.allclose(full, sub, rtol=1e-4, atol=1e-4 * float(scale)):
        raise ValueError(
            f"the receptive-field subgraph ({hops} hops) does not reproduce the full-graph "
            f"activations at layer {layer!r}; the model may propagate outside "
            "torch_geometric MessagePassing.propagate: pass hops=<radius> explicitly")


def _parameterise(kind, model, layer, sub: Subgraph, graph, generators, opts, engine, schedule):
    feats = struct = None
    if kind in ("features", "joint"):
        binary = is_binary(graph.x) if opts.binary is None else opts.binary
        if binary and opts.binary is not None and not is_binary(sub.x[sub.free]):
            raise ValueError("binary=True but the reference features are not all 0/1")
        settings = dict(per_row=opts.per_row, slope=opts.slope, margin=opts.margin,
                        margin_weight=opts.margin_weight, population=graph.x)
        if binary and not opts.size_independent and isinstance(engine, FastEngine):
            feats = FusedBinaryFeatures(sub, generators, dispatch.get("update", engine.name), schedule,
                                        fixed_edges=kind == "features", **settings)
        else:
            feats = FeatureParam(sub, generators, binary=binary,
                                 size_independent=opts.size_independent, **settings)
    if kind in ("structure", "joint"):
        _check_uses_edge_weight(model, layer, sub)
        struct = StructureParam(sub, generators, slope=opts.edge_slope,
                                dense_max_nodes=opts.dense_max_nodes, block_size=opts.block_size,
                                resample_every=opts.resample_every)
        if int(struct.budgets.sum()) == 0:
            raise ValueError("the graph has no edges within the receptive field; structure and "
                             "joint metamers need edges to rearrange")
    return feats, struct


def _check_uses_edge_weight(model, layer, sub: Subgraph) -> None:
    """Structure metamers feed edges as weights: refuse models that ignore ``edge_weight``."""
    if sub.edge_index.shape[1] == 0:
        raise ValueError("the graph has no edges; structure and joint metamers need edges")
    ones = sub.x.new_ones(sub.edge_index.shape[1])
    with torch.no_grad():
        try:
            with_edges = layer_output(model, layer, sub.x, sub.edge_index, ones, batch=sub.pool_batch,
                                      forward_kwargs=sub.forward_kwargs)
        except TypeError as err:
            raise TypeError("structure metamers need a model called as model(x, edge_index, "
                            f"edge_weight); this model refused edge_weight: {err}") from err
        without = layer_output(model, layer, sub.x, sub.edge_index, torch.zeros_like(ones), batch=sub.pool_batch,
                               forward_kwargs=sub.forward_kwargs)
    if torch.equal(with_edges[sub.center], without[sub.center]):
        raise ValueError(
            "the model ignores edge_weight at this layer (activations with all edge weights 0 "
            "equal those with weights 1), so structure metamers cannot be built for it; use a "
            "model whose layers take edge_weight (e.g. fastmetamer.models.*)")


def _step_losses(engine, sub: Subgraph, feats, struct) -> tuple[Tensor, Tensor]:
    x, penalty = feats.features() if feats is not None else (sub.x, sub.x.new_zeros(()))
    if struct is not None:
        edge_index, edge_weight = struct.edges()
    else:
        edge_index, edge_weight = sub.edge_index, sub.edge_weight
    return engine.losses(x, edge_index, edge_weight), penalty


def _refine(engine, sub: Subgraph, feats, struct, best: BestStates, generators, stop_below: Tensor,
            restart_above: Tensor | None, opts: Options, shared_loss: bool, copyable: bool) -> tuple[dict, Tensor]:
    """The best states of the straight-through phase ({"features": X' of the free rows [F, d],
    "structure": chosen pairs [sum B, 2]}), binary features then edges refined by the swap search
    (:mod:`.refine`); also the search's loss history [iterations, C]. ``shared_loss``: one loss over
    many targets; ``copyable``: states may be evaluated on disjoint copies of the graph;
    ``restart_above`` [C]: a search stuck above it starts once more from a random state."""
    kinds = [k for k, p in (("features", feats), ("structure", struct)) if p is not None]
    states = dict(zip(kinds, best.dense_states()))
    runs = [stop_below.new_empty(0, sub.num_components)]
    iterations = opts.refine_steps if opts.refine_steps is not None else 0 if shared_loss else DEFAULT_REFINE_STEPS
    search = dict(iterations=iterations, kicks=opts.refine_kicks, stop_below=stop_below,
                  restart_above=restart_above)
    x = sub.x
    if feats is not None and feats.binary and iterations > 0:
        edge_index, edge_weight = (sub.edge_index, sub.edge_weight) if struct is None else \
            struct.edges_of(states["structure"])
        moves = FeatureMoves(engine, sub, edge_index, edge_weight, opts.per_row, by_ones=struct is None,
                             shared_loss=shared_loss, copyable=copyable)
        found, _, history = refine(moves, states["features"] > 0.5, generators, **search)
        states["features"] = found.to(sub.x.dtype)
        x = moves.features(found)
        runs.append(history)
    if struct is not None and iterations > 0:
        if feats is not None and not feats.binary:
            x = _with_free_rows(sub, states["features"])
        moves = StructureMoves(engine, sub, struct, x, states["structure"], shared_loss, copyable)
        found, _, history = refine(moves, moves.start, generators, **search)
        states["structure"] = moves.chosen(found)
        runs.append(history)
    return states, torch.cat(runs)


#: Swap-search iterations of independent problems when ``refine_steps`` is None.
DEFAULT_REFINE_STEPS = 200


def _with_free_rows(sub: Subgraph, rows: Tensor) -> Tensor:
    """The problem graph's features [m, d] with the free rows replaced by ``rows`` [F, d]."""
    x = sub.x.clone()
    x[sub.free] = rows.to(x.dtype)
    return x


def _metamer_graph(sub: Subgraph, graph: Data, struct, states: dict) -> Data:
    x = _with_free_rows(sub, states["features"]) if "features" in states else sub.x
    if struct is None:
        return _subgraph_data(sub, graph, x, sub.edge_index, sub.edge_weight)
    edge_index, edge_weight = struct.edges_of(states["structure"])
    # grouped by problem (stable): a problem's edges do not depend on which others share the batch
    order = torch.argsort(sub.component[edge_index[1]], stable=True)
    return _subgraph_data(sub, graph, x, edge_index[:, order], None if edge_weight is None else edge_weight[order])


def _unchanged(sub: Subgraph, struct, states: dict) -> Tensor:
    """[C] bool: the metamer equals the reference over R (features of R and edges among R): a
    *trivial* target, which never passes (SPEC §2.3)."""
    changed = torch.zeros(sub.num_components, dtype=torch.long, device=sub.x.device)
    if "features" in states:
        rows = (states["features"] != sub.x[sub.free]).any(1)
        changed.index_add_(0, sub.component[sub.free], rows.long())
    if struct is not None:
        n = sub.num_nodes
        chosen, ref = states["structure"], struct.reference_pairs
        new = ~torch.isin(chosen[:, 0] * n + chosen[:, 1], ref[:, 0] * n + ref[:, 1])
        changed.index_add_(0, struct.state_owner, new.long())
    return changed == 0


def _subgraph_data(sub: Subgraph, graph: Data, x, edge_index, edge_weight) -> Data:
    data = Data(x=x, edge_index=edge_index, n_id=sub.node_ids, free_mask=sub.free,
                batch=sub.component, center=sub.center)
    if edge_weight is not None:
        data.edge_weight = edge_weight
    if isinstance(getattr(graph, "y", None), Tensor) and graph.y.shape[:1] == (graph.num_nodes,):
        data.y = graph.y[sub.node_ids]
    return data
