"""The fast engine: runs a lowered program with fused kernels of one backend.

Same interface as :class:`~fastmetamer.engines.reference.ReferenceEngine`; its ``losses`` is
differentiable (through autograd functions over the fused ops) w.r.t. the features and the edge
weights. Sparsity patterns, sort orders and transposes are cached per edge list, so a step of a
feature metamer does no sorting, transposing or normalising of the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..graph.neighbourhood import in_edges
from ..graph.subgraph import Subgraph
from ..ops import dispatch
from . import attention
from . import functions as F
from .csr import BinaryRows, Operator, Pattern
from .lowering import Program, Stage
from .reference import loss_scale


def _node_columns(stage: Stage, n: int, device) -> tuple[Tensor, int]:
    """(column [n] of every node's own entry, num_cols) of the stage's operator: node j's entry is
    its self loop, or for a stage with a root weight ("mean"), whose operator is [A | I] over the
    stacked input [x W; x W_r], column n + j."""
    loops = torch.arange(n, device=device)
    return (loops + n, 2 * n) if stage.operator == "mean" else (loops, n)


def _coordinates(edge_index: Tensor, node_col: Tensor) -> tuple[Tensor, Tensor]:
    """(row [E + n], col [E + n]) of a stage's operator in coordinate form: one entry per edge
    (row = destination, col = source), then one per node (column ``node_col``)."""
    src, dst = edge_index
    return torch.cat([dst, torch.arange(node_col.numel(), device=dst.device)]), torch.cat([src, node_col])


def _values(stage: Stage, edge_index: Tensor, edge_weight: Tensor | None, n: int) -> Tensor:
    """The operator's values [E + n] in the order of :func:`_coordinates` ([n] for the identity),
    times the stage's ``operator_scale``, differentiable w.r.t. ``edge_weight`` [E] (ignored by
    an unweighted stage; None: every edge weighs 1)."""
    value = _unscaled_values(stage, edge_index, edge_weight if stage.weighted else None, n)
    return value if stage.operator_scale == 1.0 else value * stage.operator_scale


def _unscaled_values(stage: Stage, edge_index: Tensor, weight: Tensor | None, n: int) -> Tensor:
    """:func:`_values` before the stage's ``operator_scale`` (the identity: n ones, no edges)."""
    src, dst = edge_index
    if stage.operator == "identity":
        return torch.ones(n, device=src.device)
    if stage.operator in ("gcn", "gcn_pyg"):
        return _gcn_values(src, dst, weight, n, remaining_loops=stage.operator == "gcn_pyg")
    if weight is None:
        weight = torch.ones(src.numel(), device=src.device)
    if stage.operator == "gat_pyg":  # PyG's GATConv drops the graph's self loops: weight 0
        weight = weight.masked_fill(src == dst, 0.0)
    if stage.operator in ("sum_self", "gat", "gat_pyg"):  # attention: the entries' softmax weights
        return torch.cat([weight, torch.full((n,), 1.0 + stage.eps, device=src.device)])
    degree = torch.zeros(n, device=src.device).index_add(0, dst, weight)
    degree = torch.where(degree > 0, degree, torch.ones_like(degree))
    return torch.cat([weight / degree.index_select(0, dst), torch.ones(n, device=src.device)])


def _gcn_values(src: Tensor, dst: Tensor, weight: Tensor | None, n: int, remaining_loops: bool) -> Tensor:
    """Values [E + n] of D^-1/2 (A_w + L) D^-1/2: one per edge, then each node's self loop.

    ``remaining_loops=False`` (the zoo's ``gcn_normalize``): L = I, existing self loops stay
    ordinary edges. ``True`` (PyG's ``gcn_norm`` with ``add_remaining_self_loops``): existing
    self loops count as absent (their entries get value 0) and their weight replaces the unit
    loop of their node. O(n + E), differentiable w.r.t. ``weight`` [E] (None: unit weights)."""
    loop_weight = torch.ones(n, device=src.device, dtype=torch.float32 if weight is None else weight.dtype)
    if remaining_loops:
        is_loop = src == dst
        if bool(is_loop.any()):
            if weight is None:
                weight = (~is_loop).float()
            else:
                loop_weight = loop_weight.index_put((src[is_loop],), weight[is_loop])
                weight = weight.masked_fill(is_loop, 0.0)
    if weight is None:
        degree = loop_weight + torch.bincount(dst, minlength=n)
    else:
        degree = loop_weight.index_add(0, dst, weight)
    inv_sqrt = degree.pow(-0.5).masked_fill(degree == 0, 0.0)
    edge = inv_sqrt.index_select(0, src) * inv_sqrt.index_select(0, dst)
    return torch.cat([edge if weight is None else edge * weight, inv_sqrt * loop_weight * inv_sqrt])


@dataclass
class _UnitScales:
    """A stage's operator s A as unit weights over a CSR (``rowptr`` [n + 1], ``col`` [E]) and
    per-node scales (None: 1): row i of s A (x W) + self is ``row_scale[i] * sum_{entries}
    source_scale[j] x_j W + self_scale[i] * self[i]``, with the rows' self-loop entries left out
    when ``skip_loops``."""

    rowptr: Tensor
    col: Tensor
    source_scale: Tensor | None
    row_scale: Tensor | None
    self_scale: Tensor | None
    skip_loops: bool


def _unit_scales(stage: Stage, edge_index: Tensor, n: int) -> _UnitScales:
    """The per-node scales of an unweighted stage's operator (the values of :func:`_values` with
    unit edge weights, factored): GCN's D^-1/2 on both sides (PyG's ``gcn_norm`` counts a node's
    existing self loops as absent and adds one of weight 1: ``skip_loops``), a mean's 1 / degree
    (1 for a node without in-edges), GIN's 1 + eps on the node's own term, the identity's self
    term alone (an empty CSR); all times ``operator_scale``. O(n + E)."""
    scale, device = stage.operator_scale, edge_index.device
    if stage.operator == "identity":
        empty = edge_index.new_zeros(0)
        return _UnitScales(edge_index.new_zeros(n + 1), empty, None, None, _full(n, scale, device), False)
    csr = in_edges(edge_index, n)
    degree = csr.rowptr.diff()
    if stage.operator == "mean":
        mean = scale / degree.clamp_min(1).float()
        return _UnitScales(csr.rowptr, csr.source, None, mean, _full(n, scale, device), False)
    if stage.operator == "sum_self":
        own = _full(n, scale * (1.0 + stage.eps), device)
        return _UnitScales(csr.rowptr, csr.source, None, _full(n, scale, device), own, False)
    remaining_loops = stage.operator == "gcn_pyg"
    if remaining_loops:
        src, dst = edge_index
        degree = degree - torch.bincount(dst[src == dst], minlength=n)
    inv_sqrt = (degree + 1).float().pow(-0.5)
    row_scale = inv_sqrt if scale == 1.0 else inv_sqrt * scale
    return _UnitScales(csr.rowptr, csr.source, inv_sqrt, row_scale, row_scale, remaining_loops)


def _full(n: int, value: float, device) -> Tensor | None:
    """[n] of ``value`` on ``device``, or None for 1 (the kernels' default scale)."""
    return None if value == 1.0 else torch.full((n,), value, device=device)


@dataclass
class _Caches:
    """What a :class:`FastEngine` keeps between calls, each entry with what it is valid for.

    ``patterns``: {operator kind: (edge_index, full Pattern)}; ``plan``: (edge_index, _RowPlan);
    ``operators``: {stage index: (plan, edge_weight, restricted Operator)}; ``joined``: {id(stage):
    (stage, [weight | root_weight | residual])}; ``first_stage``: (x, x._version, plan, (h, inputs,
    residual)) for fixed features."""

    patterns: dict = field(default_factory=dict)
    plan: tuple | None = None
    operators: dict = field(default_factory=dict)
    joined: dict = field(default_factory=dict)
    first_stage: tuple | None = None


class FastEngine:
    """Fused-kernel engine for a lowered program (see ReferenceEngine for the arguments)."""

    def __init__(self, program: Program, backend: str, model: nn.Module, sub: Subgraph,
                 target: Tensor, joint: bool):
        self.program, self.name, self.model, self.sub = program, backend, model, sub
        self.layer = program.layer
        self.kernels = {op: dispatch.get(op, backend) for op in dispatch.OPS}
        self.target = target.contiguous()
        self.component = (torch.zeros if joint else torch.arange)(target.shape[0], dtype=torch.long,
                                                                  device=target.device)
        self.scale = loss_scale(target, joint)
        self._caches = _Caches()
        self._entries = attention.EntryIndex()
        self._transposes = True  # patterns carry their transpose (the backward needs it)

    @classmethod
    def forward_only(cls, program: Program, backend: str, model: nn.Module) -> "FastEngine":
        """An engine for :meth:`all_activations` alone (no targets, no loss)."""
        engine = cls.__new__(cls)
        engine.program, engine.name, engine.model, engine.layer = program, backend, model, program.layer
        engine.kernels = {op: dispatch.get(op, backend) for op in dispatch.OPS}
        engine._caches, engine._transposes = _Caches(), False
        engine._entries = attention.EntryIndex()
        return engine

    @torch.no_grad()
    def all_activations(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """The matched layer's activations of every node [n, d_l] through the lowered program:
        memory O(n d + E) (CSR aggregations; no per-edge message tensor). Stages that see no
        edge weights propagate over the graph's cached in-edge CSR with unit weights and
        per-node scales (:func:`_unit_scales`): no per-edge values, no operator CSR. A pooled
        program pools every node as one graph ([1, d_l])."""
        h, operators, n, outputs = x, {}, x.shape[0], []
        for stage in self.program.stages:
            teleport = None if stage.teleport is None else outputs[stage.teleport[0]]
            if stage.attention is not None or (stage.weighted and edge_weight is not None):
                kind = (stage.operator, stage.eps, stage.operator_scale)
                if kind not in operators:  # stages of one kind share their operator
                    operators[kind] = self._operator(stage, edge_index, edge_weight, n)
                h = self._propagate(stage, h, self._transform(stage, h, None), operators[kind], teleport)
            else:
                kind = (stage.operator, stage.eps, stage.operator_scale, "unit")
                if kind not in operators:
                    operators[kind] = _unit_scales(stage, edge_index, n)
                h = self._propagate_unit(stage, h, operators[kind], teleport)
            outputs.append(h)
        return h if self.program.pool is None else self._pool(h, None)

    def _propagate_unit(self, stage: Stage, h: Tensor, scales: "_UnitScales", teleport: Tensor | None) -> Tensor:
        """One stage over a CSR with unit weights: act(s * A (h W) + t * self + bias) (then the
        post layers, residual and teleport term)."""
        inputs = self._transform(stage, h, None) if stage.root_weight is None else h @ stage.weight
        if scales.source_scale is not None:  # D^-1/2 (A + I) D^-1/2: scale the sources first
            inputs = inputs * scales.source_scale.unsqueeze(1)
        own = inputs if stage.root_weight is None else h @ stage.root_weight
        out = self.kernels["aggregate"].propagate_forward(
            scales.rowptr, scales.col, inputs, scales.row_scale, own, scales.self_scale, stage.bias, stage.act,
            scales.skip_loops)
        return self._with_teleport(stage, self._post(stage, out, self._residual(stage, h)), teleport)

    @torch.no_grad()
    def activations(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """Layer-l activations at the targets [T, d_l] through the lowered program (as the
        whole-graph pass that gives the criterion's null set), without gradients."""
        return self._run(x, edge_index, edge_weight, loss=False)

    def losses(self, x: Tensor | BinaryRows, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """L_act per problem [C], differentiable w.r.t. ``x`` [m, d] and ``edge_weight`` [E].

        ``x`` may be :class:`~fastmetamer.engines.csr.BinaryRows` (binary features by their
        ones): the first dense product then gathers weight rows instead of multiplying by the
        dense 0/1 matrix, and the gradient goes to the optimised rows only.

        Each stage computes only the rows that reach the targets (see :class:`_RowPlan`): the
        frozen boundary ring and the outer hops of a receptive field cost nothing per step."""
        return self._run(x, edge_index, edge_weight, loss=True)

    def target_outputs(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """Layer-l activations at the targets [T, d_l] through the lowered program,
        differentiable w.r.t. ``x`` [m, d] and ``edge_weight`` [E]; like :meth:`losses`, only
        the rows that reach the targets are computed."""
        return self._run(x, edge_index, edge_weight, loss=False)

    def _run(self, x: Tensor | BinaryRows, edge_index: Tensor, edge_weight: Tensor | None, loss: bool) -> Tensor:
        stages = self.program.stages
        plan = self._plan(edge_index, x.shape[0])
        outputs, values = [], {}
        matched = len(stages) - 1 if self.program.pool is None else len(stages)  # pooled: after the stages
        for i, stage in enumerate(stages):
            operator = self._restricted_operator(i, stage, plan, edge_index, edge_weight, x.shape[0], values)
            if i == 0:
                h, inputs, residual = self._first_stage_inputs(x, plan)
            else:
                inputs, residual = self._transform_with_residual(stage, h, None)
            if stage.operator != "identity":
                inputs = self._exchanged(inputs, stage)
            positions = plan.self_positions[i]
            residual = _rows_of(residual, positions)
            h_rows = _rows_of(h, positions) if _reads_own_rows(stage, residual) else None
            teleport = None if stage.teleport is None else _rows_of(outputs[stage.teleport[0]],
                                                                     plan.teleport_positions[i])
            if i == matched:
                if loss:
                    return self._matched(stage, h_rows, inputs, operator, teleport, positions, residual)
                return self._propagate(stage, h_rows, inputs, operator, teleport, positions, residual)
            h = self._propagate(stage, h_rows, inputs, operator, teleport, positions, residual)
            outputs.append(h)
        pooled = self._pool(h, self.sub.pool_batch)
        if not loss:
            return pooled
        diff = (pooled - self.target).pow(2).sum(1)
        return torch.zeros_like(self.scale).index_add(0, self.component, diff) / self.scale

    def _exchanged(self, inputs: Tensor, stage: Stage) -> Tensor:
        """A stage's transformed input before it aggregates: here as it is (a partitioned
        engine receives its halo rows there, see :mod:`fastmetamer.metamers.partitioned`)."""
        return inputs

    def _pool(self, h: Tensor, batch: Tensor | None) -> Tensor:
        """The pooled program's readout [G, d]: the rows of ``h`` [n, d] summed, averaged or
        maximised per graph id in ``batch`` [n] (None: one graph), as PyG's global pooling."""
        from torch_geometric.nn import global_add_pool, global_max_pool, global_mean_pool

        pool = {"add": global_add_pool, "mean": global_mean_pool, "max": global_max_pool}[self.program.pool]
        return pool(h, batch)

    def _first_stage_inputs(self, x: Tensor | BinaryRows, plan: "_RowPlan"):
        """(dense rows of x the first stage reads or None, its transformed input, its residual or
        None; see :meth:`_transform_with_residual`). Kept while ``x`` is the same unchanged tensor
        and nothing needs a gradient (fixed features: structure metamers, their swap search)."""
        known = self._caches.first_stage
        if known is not None and known[0] is x and known[1] == x._version and known[2] is plan:
            return known[3]
        stage = self.program.stages[0]
        h, sparse = self._first_input(x, plan.inputs, _reads_dense_input(stage, x))
        inputs, residual = self._transform_with_residual(stage, h, sparse)
        out = (h, inputs, residual)
        if isinstance(x, Tensor) and not any(t is not None and t.requires_grad for t in (x, *out)):
            self._caches.first_stage = (x, x._version, plan, out)
        return out

    def _first_input(self, x: Tensor | BinaryRows, rows: Tensor, dense_needed: bool):
        """(dense rows of x or None, BinaryRows or None) restricted to the rows the first stage reads."""
        if not isinstance(x, BinaryRows):
            return (x if rows.numel() == x.shape[0] else x.index_select(0, rows)), None
        if rows.numel() == x.shape[0]:
            return (F.binary_dense(x) if dense_needed else None), x
        sparse = x.restrict(rows)
        if sparse is None:  # an optimised row outside the rows read: gradient zero there
            dense = F.binary_dense(x).index_select(0, rows)
            return dense, None
        return (F.binary_dense(sparse) if dense_needed else None), sparse

    def _plan(self, edge_index: Tensor, n: int) -> "_RowPlan":
        """The rows each stage computes for these edges (cached while the edge tensor is reused)."""
        known = self._caches.plan
        if known is not None and known[0] is edge_index:
            return known[1]
        stages = self.program.stages
        rows = self.sub.center if self.program.pool is None else torch.arange(n, device=edge_index.device)
        plan = _RowPlan.build([self._pattern(stage, edge_index, n) for stage in stages],
                              [stage.root_weight is not None for stage in stages], rows,
                              [None if stage.teleport is None else stage.teleport[0] for stage in stages])
        self._caches.plan = (edge_index, plan)
        return plan

    def _pattern(self, stage: Stage, edge_index: Tensor, n: int) -> Pattern:
        """The stage's full pattern for these edges, one cached per kind of stage."""
        known = self._caches.patterns.get(stage.operator)
        if known is None or known[0] is not edge_index:
            if stage.operator == "identity":
                known = (edge_index, Pattern.identity(n, self._transposes, edge_index.device))
                self._caches.patterns[stage.operator] = known
                return known[1]
            node_col, num_cols = _node_columns(stage, n, edge_index.device)
            coordinates = _coordinates(edge_index, node_col) if self._transposes else None
            pattern = Pattern.from_in_edges(in_edges(edge_index, n), node_col, num_cols, coordinates)
            known = (edge_index, pattern)
            self._caches.patterns[stage.operator] = known
        return known[1]

    def _restricted_operator(self, i: int, stage: Stage, plan: "_RowPlan", edge_index: Tensor,
                             edge_weight: Tensor | None, n: int, values: dict) -> Operator:
        """Stage i's operator on the plan's rows and columns, with this step's values (cached
        while they carry no gradient). ``values``: the values of this pass by kind of stage,
        filled here (stages of one kind, e.g. APPNP's K steps, share them)."""
        if not stage.weighted:
            edge_weight = None
        cached = self._caches.operators.get(i)
        if cached is not None and cached[0] is plan and cached[1] is edge_weight:
            return cached[2]
        kind = (stage.operator, stage.eps, stage.operator_scale, stage.weighted)
        if kind not in values:
            values[kind] = _values(stage, edge_index, edge_weight, n).float()
        operator = Operator.build(plan.patterns[i], values[kind])
        if edge_weight is None or not edge_weight.requires_grad:
            self._caches.operators[i] = (plan, edge_weight, operator)
        return operator

    def _operator(self, stage: Stage, edge_index: Tensor, edge_weight: Tensor | None, n: int) -> Operator:
        """The stage's full operator (every row) for these edges (forward passes over a whole graph)."""
        value = _values(stage, edge_index, edge_weight, n)
        return Operator.build(self._pattern(stage, edge_index, n), value.float())

    def _transform(self, stage: Stage, h: Tensor | None, sparse: BinaryRows | None) -> Tensor:
        """The aggregation's input: h @ weight (h itself where the weight is None, the identity;
        stacked with h @ root_weight when present)."""
        return self._transform_with_residual(stage, h, sparse)[0]

    def _transform_with_residual(self, stage: Stage, h: Tensor | None,
                                 sparse: BinaryRows | None) -> tuple[Tensor, Tensor | None]:
        """(the aggregation's input as :meth:`_transform`, x @ residual matrix at the input rows or
        None). Binary features (``sparse``) take every product with x in one gather and one
        backward GEMM over [weight | root_weight | residual]; otherwise the residual is left to
        :meth:`_residual` (None)."""
        if stage.weight is None:
            return (F.binary_dense(sparse) if h is None else h), None
        if sparse is None:
            if stage.root_weight is None:
                return h @ stage.weight, None
            return torch.cat([h @ stage.weight, h @ stage.root_weight]), None
        weights = _products_by_ones(stage)
        if len(weights) == 1:
            return F.binary_linear(sparse, stage.weight, self.kernels), None
        products = F.binary_linear(sparse, self._joined(stage, weights), self.kernels)
        parts = products.split([w.shape[1] for w in weights], dim=1)
        inputs = parts[0].contiguous() if stage.root_weight is None else torch.cat(parts[:2])
        return inputs, (parts[-1].contiguous() if _residual_by_ones(stage) else None)

    def _joined(self, stage: Stage, weights: list[Tensor]) -> Tensor:
        """The stage's ``weights`` side by side [d, sum f], cached per stage."""
        known = self._caches.joined.get(id(stage))
        if known is None or known[0] is not stage:
            known = (stage, torch.cat(weights, dim=1).contiguous())
            self._caches.joined[id(stage)] = known
        return known[1]

    def _residual(self, stage: Stage, h: Tensor) -> Tensor | None:
        if stage.residual is None:
            return None
        return h if isinstance(stage.residual, str) else h @ stage.residual

    def _propagate(self, stage: Stage, h: Tensor, inputs: Tensor, operator: Operator,
                   teleport: Tensor | None = None, positions: Tensor | None = None,
                   residual: Tensor | None = None) -> Tensor:
        """The stage's output at its rows (``h``: its input there; ``inputs``: the transformed
        input at the input rows; ``positions``: the stage's rows among those, None: the same;
        ``residual``: the residual term at the stage's rows, None: computed from ``h``)."""
        if residual is None:
            residual = self._residual(stage, h)
        if stage.attention is not None:
            xw = attention.source_features(stage, inputs)
            xr = attention.destination_features(stage, xw, h, positions)
            out = attention.attend(stage, xw, xr, operator, self._entries, self.kernels, residual)
            return self._with_teleport(stage, out, teleport)
        if stage.fused_epilogue and teleport is None:
            return F.aggregate(inputs, operator, self.kernels, stage.bias, stage.act, residual)
        out = F.aggregate(inputs, operator, self.kernels, stage.bias, stage.act)
        return self._with_teleport(stage, self._post(stage, out, residual), teleport)

    @staticmethod
    def _with_teleport(stage: Stage, out: Tensor, teleport: Tensor | None) -> Tensor:
        """``out`` plus the stage's teleport term alpha * h_src (``teleport``: h_src at its rows)."""
        return out if teleport is None else out + stage.teleport[1] * teleport

    @staticmethod
    def _post(stage: Stage, out: Tensor, residual: Tensor | None) -> Tensor:
        """The stage's dense tail on the aggregation ``out``, plus ``residual`` (None: none)."""
        from ..ops.activations import apply

        for dense in stage.post:
            product = out @ dense.weight if dense.bias is None else torch.addmm(dense.bias, out, dense.weight)
            out = apply(product, dense.act, inplace=True)
        return out if residual is None else out + residual

    def _matched(self, stage: Stage, h: Tensor | None, inputs: Tensor, rows: Operator,
                 teleport: Tensor | None, positions: Tensor | None, residual: Tensor | None) -> Tensor:
        """The matched stage at the targets (``rows``: its operator restricted to them; ``h``: the
        stage input at the targets; ``teleport``: the teleport source there; ``residual``: as
        :meth:`_propagate`) fused with the loss where the epilogue allows."""
        if stage.fused_epilogue and stage.residual is None and teleport is None:
            return F.matched_loss(inputs, rows, self.kernels, self.target, self.component,
                                  self.scale, stage.bias, stage.act)
        out = self._propagate(stage, h, inputs, rows, teleport, positions, residual)
        diff = (out - self.target).pow(2).sum(1)
        return torch.zeros_like(self.scale).index_add(0, self.component, diff) / self.scale


@dataclass
class _RowPlan:
    """Which rows each stage of a program computes so that the targets' outputs are exact.

    Stage L-1 computes the targets; stage i computes the nodes stage i+1 reads, and the program
    input is read at the nodes stage 0 reads. ``patterns[i]``: stage i's pattern on its rows,
    columns renumbered to positions among the rows stage i-1 computed (``inputs`` for i = 0);
    ``self_positions[i]`` [r_i]: the position of each of stage i's rows among its input rows
    (for a residual or root term; None where they are the same rows, e.g. a whole graph);
    ``teleport_positions[i]``: for a stage with a teleport term from stage src, the position
    of each of its rows among stage src's rows (every operator with a node entry per row keeps
    a stage's rows among the rows of the stages before it), else None."""

    inputs: Tensor
    patterns: list
    self_positions: list
    teleport_positions: list

    @classmethod
    def build(cls, full: list[Pattern], stacked: list[bool], targets: Tensor,
              teleports: list[int | None]) -> "_RowPlan":
        n = full[-1].num_rows
        if targets.numel() == n and bool((targets == torch.arange(n, device=targets.device)).all()):
            none = [None] * len(full)  # every node is a target: all rows
            return cls(targets, list(full), none, none)
        rows = [None] * len(full)
        rows[-1] = targets
        for i in range(len(full) - 1, 0, -1):
            rows[i - 1] = full[i].columns_of(rows[i], stacked[i])
        inputs = full[0].columns_of(rows[0], stacked[0])
        reads = [inputs, *rows[:-1]]
        return cls(inputs, [p if _is_everything(p, r, c, s) else p.submatrix(r, c, s)
                            for p, r, c, s in zip(full, rows, reads, stacked)],
                   [torch.searchsorted(c, r) for r, c in zip(rows, reads)],
                   [None if src is None else torch.searchsorted(rows[src], r) for src, r in zip(teleports, rows)])


def _reads_dense_input(stage: Stage, x: Tensor | BinaryRows) -> bool:
    """Whether the first stage reads its input ``x`` densely besides its products with matrices
    (an identity residual, GATv2's destination transform; a residual matrix unless ``x`` is
    binary, see :func:`_residual_by_ones`)."""
    if stage.attention is not None and stage.attention.dst_weight is not None:
        return True
    return stage.residual is not None and not (isinstance(x, BinaryRows) and _residual_by_ones(stage))


def _reads_own_rows(stage: Stage, residual: Tensor | None) -> bool:
    """Whether the stage reads its input at its own rows: attention's destination side, or a
    residual not given as ``residual``."""
    return stage.attention is not None or (stage.residual is not None and residual is None)


def _residual_by_ones(stage: Stage) -> bool:
    """Whether binary features reach the stage's residual as one more product by their ones
    (a residual matrix beside a weight)."""
    return isinstance(stage.residual, Tensor) and stage.weight is not None


def _products_by_ones(stage: Stage) -> list[Tensor]:
    """The matrices a stage multiplies binary features by: weight, root weight, residual."""
    weights = [stage.weight] + ([] if stage.root_weight is None else [stage.root_weight])
    return weights + ([stage.residual] if _residual_by_ones(stage) else [])


def _rows_of(h: Tensor | None, positions: Tensor | None) -> Tensor | None:
    """``h`` at ``positions`` (all of it for None; None for None)."""
    return h if h is None or positions is None else h.index_select(0, positions)


def _is_everything(pattern: Pattern, rows: Tensor, cols: Tensor, stacked: bool) -> bool:
    """Whether ``rows`` are all the pattern's rows in order and ``cols`` all its nodes (a whole
    graph): the full pattern is then its own restriction, and no copy is made."""
    nodes = pattern.num_cols // 2 if stacked else pattern.num_cols
    return rows.numel() == pattern.num_rows and cols.numel() == nodes and \
        bool((rows == torch.arange(rows.numel(), device=rows.device)).all())
