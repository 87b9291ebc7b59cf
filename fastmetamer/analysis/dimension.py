"""Local metamer dimension and volume change of node representations (SPEC §3).

For a target node v at layer l, J_v = d h^l_v / d vec(X_{R(v)}) [d_l, |R| d] is the Jacobian of
v's representation with respect to the features of its receptive field R(v) (``wrt="features"``),
of v's own features only (``wrt="self"``, [d_l, d]), or of the weights of the edges among R(v)
(``wrt="edges"``, [d_l, E_R]; every stored directed edge is one input).

* rank: the number of singular values of J_v above ``tol`` (default as
  ``torch.linalg.matrix_rank``: sigma_max * max(d_l, input_dim) * eps(float64)).
* dimension D_v = input_dim - rank: the dimension of the set of inputs the model locally cannot
  tell apart from the reference (the local metamer manifold).
* rank_deficit = d_l - rank: output directions the model cannot reach (dead ReLUs show here).
* log_volume = sum_{i <= rank} log sigma_i = 1/2 log det of J_v J_v^T on its nonzero spectrum.

How it is computed: every target gets a private copy of its receptive field (a disjoint union),
so one backward pass with the cotangent e_k at every target yields row k of every target's J_v
at once without cross-talk; the d_l cotangents run as one batched backward
(``is_grads_batched``). Everything is in float64. The frozen boundary ring (ring l'+1, which keeps
the in-degrees of R exact for GCN-style normalisation) is shared by all copies: a boundary node
has no incoming edges in the union and its messages reach a target only after l'+1 hops, so
sharing it is exact and keeps the union close to sum_v |R(v)| nodes.
The d_l x d_l Gram G_v = J_v J_v^T is then held in factored form G_v = R_v^T R_v, with R_v
[d_l, d_l] from a tall-skinny QR tree over the per-node blocks of J_v^T (batched over all
targets), and sigma = svdvals(R_v). Forming G_v explicitly and taking sqrt(eigvalsh(G_v)) would
square the condition number: its error is sqrt(eps) * sigma_max ~ 1e-8 sigma_max, far above the
rank tolerance, so exact zero singular values (dead ReLUs, narrow layers) would be miscounted as
rank. The QR route costs the same O(|R| d d_l^2) and is accurate to ~eps * sigma_max. Dense J_v is
never formed beyond the VJP rows of one chunk; chunks respect ``batch_size`` and ``memory_budget``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from ..graph.layers import count_hops, layer_output, resolve_layer
from .. import distributed
from ..graph.neighbourhood import in_edges, rings
from ..memory import check_budget, default_budget
from ..validation import check_devices, check_feature_width, check_graph, check_nodes

WRT = ("features", "self", "edges")
#: Gram matrices with eigenvalue ratio lambda_min / lambda_max at most this are (near-)singular:
#: their singular values are recomputed without squaring (see :func:`_singular_values`).
RCOND = 1e-8
_EPS = torch.finfo(torch.float64).eps


@dataclass
class DimensionResult:
    """Local metamer dimension and volume of each target (SPEC §3).

    Attributes:
        dimension: [T] long, input_dim - rank.
        rank: [T] long, rank of J_v.
        input_dim: [T] long, number of inputs J_v differentiates by (|R| d, d or E_R).
        rank_deficit: [T] long, d_l - rank.
        log_volume: [T] float64, sum of log singular values above the tolerance.
        singular_values: T float64 tensors [min(d_l, input_dim)], descending.
        nodes: [T] long, the target node ids; None for a graph-level (pooled) layer, whose T
            targets are the graphs of the batch (J = d g_b / d(inputs of graph b)).
        layer: module name of the layer.
        wrt: ``"features"``, ``"self"`` or ``"edges"``.
    """

    dimension: Tensor
    rank: Tensor
    input_dim: Tensor
    rank_deficit: Tensor
    log_volume: Tensor
    singular_values: list[Tensor]
    nodes: Tensor | None
    layer: str
    wrt: str

    def to_dict(self) -> dict:
        """JSON-friendly dict of plain Python lists and values."""
        return {"layer": self.layer, "wrt": self.wrt,
                "nodes": None if self.nodes is None else self.nodes.tolist(),
                "dimension": self.dimension.tolist(), "rank": self.rank.tolist(),
                "input_dim": self.input_dim.tolist(), "rank_deficit": self.rank_deficit.tolist(),
                "log_volume": self.log_volume.tolist(),
                "singular_values": [s.tolist() for s in self.singular_values]}


def metamer_dimension(model: nn.Module, graph: Data, node: int | list[int] | Tensor | None = None, *,
                      layer: str | int | None = None, wrt: str = "features", tol: float | None = None,
                      batch_size: int = 1024, memory_budget: int | None = None) -> DimensionResult:
    """Local metamer dimension and log-volume of J_v = d h^l_v / d(input) for each target v.

    Args:
        model: a module called as ``model(x, edge_index[, edge_weight][, batch=batch])``, on
            ``graph.x``'s device; it is copied to float64 on the CPU (the original is untouched),
            so graphs of any floating dtype work.
        graph: ``x`` [n, d], ``edge_index`` [2, E], optional ``edge_weight`` [E] and ``batch`` [n]
            (graph id per node, for a pooled layer over several graphs).
        node: a node id, a list / 1-D tensor / numpy array of ids, or None for every node. A graph-level
            (pooled) layer such as a zoo model's ``"readout"`` needs None: each graph of the batch
            is one target and its J is taken over all of its nodes or edges (the whole graph is
            processed at once, without chunking).
        layer: module name or index among message-passing layers (default: the last one).
        wrt: ``"features"`` (X of the receptive field), ``"self"`` (x_v) or ``"edges"`` (weights
            of the edges among the receptive field).
        tol: absolute singular-value threshold; None: sigma_max * max(d_l, input_dim) * eps.
        batch_size: targets whose receptive fields are extracted together; each group is split
            further into chunks of at most ``memory_budget`` bytes of estimated float64 work
            memory (None: a quarter of the memory available, at most 2 GiB), with the same
            result as one chunk.

    Returns:
        a :class:`DimensionResult` with one entry per target, in the order given.
    """
    check_graph(graph)
    check_devices(model, graph)
    targets = check_nodes(node, graph.num_nodes, graph.x.device)
    _check_args(graph, wrt, tol, batch_size)
    check_budget(memory_budget)
    budget = default_budget(graph.x.device) if memory_budget is None else memory_budget
    problem = _Problem.build(model, graph, resolve_layer(model, layer), wrt, tol)
    if problem.graph_level:
        _check_graph_level(problem, targets)
        parts = [_solve(problem, torch.arange(problem.reference.shape[0], device=graph.x.device),
                        _whole_graphs(problem))]
    else:
        targets = torch.arange(graph.num_nodes, device=graph.x.device) if targets is None else targets
        parts = _solve_node_targets(problem, targets, batch_size, budget)
    sigma, rank, input_dim = (torch.cat([p[i] for p in parts]) for i in range(3))
    d_out = problem.d_out
    return DimensionResult(
        dimension=input_dim - rank, rank=rank, input_dim=input_dim, rank_deficit=d_out - rank,
        log_volume=_log_volume(sigma, rank),
        singular_values=[s[: min(d_out, int(k))] for s, k in zip(sigma, input_dim)],
        nodes=targets, layer=problem.layer, wrt=wrt)


def _solve_node_targets(problem: "_Problem", targets: Tensor, batch_size: int, budget: int) -> list[tuple]:
    """(sigma, rank, input_dim) of the targets [T] in order, by groups of ``batch_size`` split
    into chunks within ``budget``. Inside a process group of several ranks each rank solves a
    run of the targets balanced by receptive-field size, and every rank gets all of them."""
    if distributed.is_sharing():
        ring = rings(in_edges(problem.graph.edge_index, problem.graph.num_nodes), targets,
                     torch.arange(targets.numel(), device=targets.device), problem.hops)
        targets = targets[distributed.my_share(torch.bincount(ring.group, minlength=targets.numel()))]
    parts = [_solve(problem, chunk, _union(problem.graph, problem.fields, chunk, keys))
             for group in targets.split(batch_size) for chunk, keys in _chunks(problem, group, budget)]
    if not distributed.is_sharing():
        return parts
    return [part for rank_parts in distributed.all_gather(parts) for part in rank_parts]


def _check_graph_level(problem: "_Problem", targets: Tensor | None) -> None:
    if targets is not None:
        raise ValueError(f"layer {problem.layer!r} is graph-level (pooled): pass node=None (each "
                         "graph of the batch is a target)")
    if problem.wrt == "self":
        raise ValueError(f"wrt='self' needs a node-level layer; {problem.layer!r} is graph-level "
                         "(use 'features' or 'edges')")


def _check_args(graph: Data, wrt: str, tol, batch_size) -> None:
    if wrt not in WRT:
        raise ValueError(f"unknown wrt {wrt!r}; allowed: {list(WRT)}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not 0 <= tol < float("inf")):
        raise ValueError(f"tol must be None or a finite number >= 0, got {tol!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if wrt == "edges" and graph.edge_index.shape[1] == 0:
        raise ValueError("wrt='edges' differentiates by edge weights, but the graph has no edges")


@dataclass
class _Problem:
    """What every chunk shares: the float64 model copy and graph, the layer, its width d_l and
    full-graph output (to check exactness; [n, d_l], or [B, d_l] for a graph-level layer), the
    receptive-field radius, the incoming-edge lists and the options."""

    model: nn.Module
    graph: Data
    layer: str
    reference: Tensor
    hops: int
    fields: "_InEdges"
    wrt: str
    tol: float | None

    @property
    def d_out(self) -> int:
        return self.reference.shape[1]

    @property
    def graph_level(self) -> bool:
        """True for a pooled layer (one output row per graph, not per node)."""
        return self.reference.shape[0] != self.graph.num_nodes

    @classmethod
    def build(cls, model: nn.Module, graph: Data, layer: str, wrt: str, tol: float | None) -> "_Problem":
        """Copy ``model`` and ``graph`` to float64 on the graph's device (model in eval mode,
        frozen; edge weights [E] become ones for ``wrt="edges"`` when the graph has none)."""
        model64 = copy.deepcopy(model).to(graph.x.device).double().eval()
        for p in model64.parameters():
            p.requires_grad_(False)
        weight = getattr(graph, "edge_weight", None)
        if weight is None and wrt == "edges":
            weight = torch.ones(graph.edge_index.shape[1], device=graph.x.device)
        batch = getattr(graph, "batch", None)
        graph64 = Data(x=graph.x.detach().double(), edge_index=graph.edge_index.long(),
                       edge_weight=None if weight is None else weight.detach().double(), batch=batch)
        check_feature_width(model64, layer, graph64.x)
        with torch.no_grad():
            reference = layer_output(model64, layer, graph64.x, graph64.edge_index,
                                     graph64.edge_weight, graph64.batch)
        if reference.dim() != 2:
            raise ValueError(f"layer {layer!r} gives output of shape {tuple(reference.shape)}; "
                             "metamer_dimension needs [num_nodes, d_l] or [num_graphs, d_l]")
        return cls(model64, graph64, layer, reference, count_hops(model64, layer, graph64.x),
                   _InEdges(graph64.edge_index, graph.num_nodes), wrt, tol)


class _InEdges:
    """Incoming-edge lists (CSR by destination) for batched receptive-field extraction, from the
    graph's cached in-edge CSR (:func:`~fastmetamer.graph.neighbourhood.in_edges`, a counting
    sort). Nodes of target copy c are addressed by keys c * n + node."""

    def __init__(self, edge_index: Tensor, num_nodes: int):
        csr = in_edges(edge_index, num_nodes)
        self.n = num_nodes
        self.src = edge_index[0]
        self.order, self.ptr = csr.edge_id, csr.rowptr

    def of(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Incoming edges of ``keys`` [K]: (edge ids [M], position in ``keys`` of each edge's
        destination [M])."""
        nodes = keys % self.n
        counts = self.ptr[nodes + 1] - self.ptr[nodes]
        owner = torch.repeat_interleave(torch.arange(keys.numel(), device=keys.device), counts)
        starts = torch.repeat_interleave(self.ptr[nodes] - (counts.cumsum(0) - counts), counts)
        return self.order[starts + torch.arange(owner.numel(), device=keys.device)], owner

    def source_keys(self, keys: Tensor, edges: Tensor, owner: Tensor) -> Tensor:
        """Keys [M] of the sources of edges [M] into ``keys[owner]``, in the same copy."""
        return keys[owner] - keys[owner] % self.n + self.src[edges]

    def receptive_keys(self, targets: Tensor, hops: int) -> Tensor:
        """Sorted keys of every node within ``hops`` incoming hops of each target [T] (target t
        in copy t): the receptive fields R."""
        inner = frontier = (torch.arange(targets.numel(), device=targets.device) * self.n + targets).sort().values
        for _ in range(hops):
            frontier = torch.unique(self.source_keys(frontier, *self.of(frontier)))
            frontier = frontier[~torch.isin(frontier, inner, assume_unique=True)]
            inner = torch.cat([inner, frontier]).sort().values
        return inner


def _chunks(problem: _Problem, targets: Tensor, budget: int):
    """Split ``targets`` [T] into consecutive chunks of at most ``budget`` bytes of work memory;
    yields (chunk targets [T_c], their receptive-field keys renumbered from copy 0)."""
    n, width = problem.fields.n, problem.graph.x.shape[1]
    inner = problem.fields.receptive_keys(targets, problem.hops)
    sizes = torch.bincount(inner // n, minlength=targets.numel())
    cost = sizes * 8 * width * (problem.d_out + 2)
    _, counts = torch.unique_consecutive((cost.cumsum(0) - cost) // budget, return_counts=True)
    start = 0
    for chunk, keys in zip(targets.split(counts.tolist()), inner.split(_sums(sizes, counts))):
        yield chunk, keys - start * n
        start += chunk.numel()


def _sums(sizes: Tensor, counts: Tensor) -> list[int]:
    """Sums of ``sizes`` over consecutive groups of ``counts`` elements."""
    ends = counts.cumsum(0)
    totals = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])[ends]
    return torch.diff(totals, prepend=totals.new_zeros(1)).tolist()


@dataclass
class _Union:
    """Disjoint union of the receptive fields of T targets, with one shared boundary ring.

    Nodes 0..T-1 are the targets, nodes 0..S-1 the free nodes (all receptive fields), the rest
    the frozen boundary ring; edges 0..E_R-1 are the edges among the free nodes. For a
    graph-level layer it is the whole batch of graphs: every node and edge is free.

    Attributes:
        x: [m, d]; edge_index: [2, E]; edge_weight: [E] or None.
        owner: [S] the target (copy, or graph) each free node belongs to.
        edge_owner: [E_R] the target each edge among the free nodes belongs to.
        batch: [m] graph id per node for a graph-level layer, else None.
    """

    x: Tensor
    edge_index: Tensor
    edge_weight: Tensor | None
    owner: Tensor
    edge_owner: Tensor
    batch: Tensor | None = None


def _union(graph: Data, fields: _InEdges, targets: Tensor, inner: Tensor) -> _Union:
    """Build the :class:`_Union` of the targets [T] from their receptive-field keys ``inner``."""
    n = fields.n
    seeds = torch.arange(targets.numel(), device=targets.device) * n + targets
    free_keys = torch.cat([seeds, inner[~torch.isin(inner, seeds, assume_unique=True)]])
    edges, dst = fields.of(free_keys)
    src, in_r = _Lookup(free_keys)(fields.source_keys(free_keys, edges, dst))
    boundary, ring = torch.unique(fields.src[edges[~in_r]], return_inverse=True)
    src[~in_r] = free_keys.numel() + ring
    order = torch.argsort(~in_r, stable=True)
    weight = graph.edge_weight
    return _Union(
        x=graph.x[torch.cat([free_keys % n, boundary])],
        edge_index=torch.stack([src, dst])[:, order],
        edge_weight=None if weight is None else weight[edges[order]],
        owner=free_keys // n, edge_owner=free_keys[dst[order[: int(in_r.sum())]]] // n)


def _whole_graphs(problem: _Problem) -> _Union:
    """The batch of graphs as a :class:`_Union` whose targets are the graphs."""
    graph = problem.graph
    batch = graph.batch if graph.batch is not None else \
        torch.zeros(graph.num_nodes, dtype=torch.long, device=graph.x.device)
    return _Union(graph.x, graph.edge_index, graph.edge_weight, owner=batch,
                  edge_owner=batch[graph.edge_index[1]], batch=graph.batch)


class _Lookup:
    """Positions of query keys in ``keys`` [K] (distinct)."""

    def __init__(self, keys: Tensor):
        self.sorted, self.position = keys.sort()

    def __call__(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """(position [Q] (arbitrary where absent), found mask [Q])."""
        slot = torch.searchsorted(self.sorted, query).clamp(max=self.sorted.numel() - 1)
        return self.position[slot], self.sorted[slot] == query


def _solve(problem: _Problem, targets: Tensor, union: _Union) -> tuple[Tensor, Tensor, Tensor]:
    """(singular values [T, d_l] descending, rank [T], input_dim [T]) for the targets [T] of
    one union."""
    owner = {"features": union.owner, "self": torch.arange(targets.numel(), device=targets.device),
             "edges": union.edge_owner}[problem.wrt]
    rows = _jacobian_rows(problem, union, targets, owner)
    sigma = _singular_values(rows, owner, targets.numel())
    input_dim = torch.bincount(owner, minlength=targets.numel()) * rows.shape[2]
    return sigma, _rank(sigma, input_dim, problem.tol), input_dim


def _jacobian_rows(problem: _Problem, union: _Union, targets: Tensor, owner: Tensor) -> Tensor:
    """Columns of every target's J_v at once: [S, d_l, w] for the first S inputs (free nodes' or
    targets' feature rows, w = d; or edge weights among R, w = 1), input s belonging to target
    ``owner[s]``; entry [s, k, :] is d h_{v,k} / d input_s. Reverse mode (d_l batched VJPs) or,
    where the largest target has fewer feature inputs than d_l (e.g. ``wrt="self"`` with d < d_l),
    forward mode (one batched JVP per input entry of the largest target)."""
    width = 1 if problem.wrt == "edges" else union.x.shape[1]
    passes = int(torch.bincount(owner, minlength=targets.numel()).max()) * width if owner.numel() else 0
    if problem.wrt != "edges" and 0 < passes < problem.d_out:
        return _jacobian_rows_forward(problem, union, targets, owner, passes)
    return _jacobian_rows_reverse(problem, union, targets, owner.numel())


def _layer_of(problem: _Problem, union: _Union, count: int):
    """(the leaf the Jacobian is taken by, f(leaf) -> the targets' outputs [T, d_l])."""
    edges = problem.wrt == "edges"
    leaf = (union.edge_weight if edges else union.x).detach()

    def outputs(value: Tensor) -> Tensor:
        x, weight = (union.x, value) if edges else (value, union.edge_weight)
        return layer_output(problem.model, problem.layer, x, union.edge_index, weight, union.batch)[:count]
    return leaf, outputs


def _jacobian_rows_forward(problem: _Problem, union: _Union, targets: Tensor, owner: Tensor, passes: int) -> Tensor:
    """:func:`_jacobian_rows` by forward mode: pass j puts tangent 1 on input entry j of every
    target at once (the targets' copies are disjoint) and reads column j of every J_v."""
    leaf, outputs = _layer_of(problem, union, targets.numel())
    with torch.no_grad():
        _check_exact(problem, outputs(leaf), targets)
    rows, width = owner.numel(), 1 if problem.wrt == "edges" else leaf.shape[1]
    order = torch.argsort(owner, stable=True)
    first = torch.searchsorted(owner[order], owner[order])  # start of each input's target group
    rank = torch.empty_like(owner)
    rank[order] = torch.arange(rows, device=owner.device) - first
    entry = (rank[:, None] * width + torch.arange(width, device=owner.device)).flatten()  # the pass of every input entry
    tangents = leaf.new_zeros(passes, rows * width)
    tangents[entry, torch.arange(rows * width, device=owner.device)] = 1.0
    tangents = torch.cat([tangents, tangents.new_zeros(passes, leaf.numel() - rows * width)], 1).view(passes, *leaf.shape)
    columns = torch.func.vmap(lambda t: torch.func.jvp(outputs, (leaf,), (t,))[1])(tangents)  # [P, T, d_l]
    return columns[entry.view(rows, width), owner[:, None]].permute(0, 2, 1)


def _jacobian_rows_reverse(problem: _Problem, union: _Union, targets: Tensor, count: int) -> Tensor:
    """:func:`_jacobian_rows` by reverse mode: the d_l cotangents e_k at every target as one
    batched backward."""
    edges = problem.wrt == "edges"
    leaf = (union.edge_weight if edges else union.x).detach().requires_grad_(True)
    x, weight = (union.x, leaf) if edges else (leaf, union.edge_weight)
    with torch.enable_grad():
        out = layer_output(problem.model, problem.layer, x, union.edge_index, weight,
                           union.batch)[: targets.numel()]
        _check_exact(problem, out.detach(), targets)
        basis = torch.eye(problem.d_out, dtype=out.dtype, device=out.device)[:, None, :].expand(-1, targets.numel(), -1)
        grads = None
        if out.requires_grad:
            (grads,) = torch.autograd.grad(out, leaf, basis, is_grads_batched=True, allow_unused=True)
    if grads is None and edges:
        raise ValueError(f"the model's layer {problem.layer!r} does not depend on edge_weight, so "
                         "wrt='edges' is undefined; use a model whose layers take edge_weight "
                         "(e.g. fastmetamer.models)")
    if grads is None:  # the layer ignores its input: J_v = 0
        grads = leaf.detach().new_zeros(problem.d_out, *leaf.shape)
    return (grads.unsqueeze(-1) if edges else grads)[:, :count].transpose(0, 1)


def _check_exact(problem: _Problem, out: Tensor, targets: Tensor) -> None:
    """ValueError unless the union reproduces the full-graph outputs of the targets [T, d_l]."""
    full = problem.reference[targets]
    if not torch.allclose(out, full, rtol=1e-7, atol=1e-9 * float(full.abs().max().clamp_min(1.0))):
        raise ValueError(
            f"the {problem.hops}-hop receptive fields do not reproduce the full-graph output of "
            f"layer {problem.layer!r}; the model must propagate only through "
            "torch_geometric MessagePassing.propagate (one call per hop)")


def _singular_values(rows: Tensor, owner: Tensor, count: int) -> Tensor:
    """Singular values [C, d_l] (descending) of each target's J_c, whose columns are spread over
    ``rows`` [S, d_l, w] (input s belongs to target ``owner[s]``).

    sqrt(eigvalsh) of the Gram J_c J_c^T where its condition number is below 1 / :data:`RCOND`
    (then every sigma is accurate to ~1e-8 relative and the rank is full); the other targets go
    through :func:`_triangular_factors` (accurate to ~eps * sigma_max, so exact zeros stay zero).
    """
    gram = rows.new_zeros(count, rows.shape[1], rows.shape[1])
    gram.index_add_(0, owner, rows @ rows.transpose(1, 2))
    eigenvalues = torch.linalg.eigvalsh(gram)
    sigma = eigenvalues.clamp_min(0).sqrt().flip(1)
    singular = (eigenvalues[:, 0] <= RCOND * eigenvalues[:, -1]).nonzero().flatten()
    if singular.numel():
        remap = torch.full((count,), -1, dtype=torch.long, device=owner.device)
        remap[singular] = torch.arange(singular.numel(), device=owner.device)
        keep = remap[owner] >= 0
        factors = _triangular_factors(rows[keep].transpose(1, 2), remap[owner[keep]], singular.numel())
        exact = torch.linalg.svdvals(factors)
        sigma[singular] = torch.cat([exact, exact.new_zeros(singular.numel(), sigma.shape[1] - exact.shape[1])], 1)
    return sigma


def _triangular_factors(blocks: Tensor, owner: Tensor, count: int) -> Tensor:
    """R_c [C, h, d_l] (h <= d_l) with R_c^T R_c = J_c J_c^T, the Gram of each target, by a
    tall-skinny QR tree over the row blocks [S, w, d_l] of the J_c^T (orthogonal steps only, so
    singular values keep float64 accuracy instead of sqrt(eps) from an explicit Gram)."""
    if blocks.shape[1] > blocks.shape[2]:
        blocks = torch.linalg.qr(blocks, mode="r").R
    counts = torch.bincount(owner, minlength=count)
    while int(counts.max()) > 1:
        blocks, owner, counts = _merge_pairs(blocks, owner, counts)
    factors = blocks.new_zeros(count, *blocks.shape[1:])
    factors[owner] = blocks
    return factors


def _merge_pairs(blocks: Tensor, owner: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One level of the QR tree: stack pairs of blocks [K, h, d_l] of the same target (a zero
    block for an odd one out) and keep the R of each pair: ([K', h', d_l], owner [K'], counts)."""
    order = torch.argsort(owner, stable=True)
    position = torch.empty_like(owner)
    position[order] = torch.arange(owner.numel(), device=owner.device) - (counts.cumsum(0) - counts)[owner[order]]
    merged = (counts + 1) // 2
    slot = (merged.cumsum(0) - merged)[owner] + position // 2
    stacked = blocks.new_zeros(int(merged.sum()), 2, *blocks.shape[1:])
    stacked[slot, position % 2] = blocks
    new_owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), merged)
    return torch.linalg.qr(stacked.flatten(1, 2), mode="r").R, new_owner, merged


def _rank(sigma: Tensor, input_dim: Tensor, tol: float | None) -> Tensor:
    """Number of singular values above the tolerance, per target [C]."""
    if tol is None:
        size = input_dim.clamp_min(sigma.shape[1]).double()
        threshold = sigma[:, :1] * (size * _EPS).unsqueeze(1)
    else:
        threshold = torch.full_like(sigma[:, :1], float(tol))
    return (sigma > threshold).sum(1)


def _log_volume(sigma: Tensor, rank: Tensor) -> Tensor:
    """sum_{i < rank} log sigma_i per target [C] (0 for rank 0)."""
    kept = torch.arange(sigma.shape[1], device=sigma.device) < rank.unsqueeze(1)
    return torch.where(kept, sigma.clamp_min(torch.finfo(sigma.dtype).tiny).log(), 0.0).sum(1)
