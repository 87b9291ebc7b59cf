"""The fast engine: runs a lowered program with fused kernels of one backend.

Same interface as :class:`~fastmetamer.engines.reference.ReferenceEngine`; its ``losses`` is
differentiable (through autograd functions over the fused ops) w.r.t. the features and the edge
weights. Sparsity patterns, sort orders and transposes are cached per edge list, so a step of a
feature metamer does no sorting, transposing or normalising of the graph.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..graph.layers import layer_output
from ..graph.neighbourhood import in_edges
from ..graph.subgraph import Subgraph
from ..ops import dispatch
from . import functions as F
from .csr import BinaryRows, Operator, Pattern
from .lowering import Program, Stage
from .reference import loss_scale


def _coo(stage: Stage, edge_index: Tensor, edge_weight: Tensor | None, n: int):
    """(row, col, value, num_cols) of the stage's operator in coordinate form (row = destination).

    For a stage with a root weight the operator is [A | I] over the stacked input [x W; x W_r]."""
    src, dst = edge_index
    if not stage.weighted:
        edge_weight = None
    weight = torch.ones(src.numel(), device=src.device) if edge_weight is None else edge_weight
    loops = torch.arange(n, device=src.device)
    if stage.operator in ("gcn", "gcn_pyg"):
        return _gcn_coo(src, dst, weight, n, remaining_loops=stage.operator == "gcn_pyg")
    if stage.operator == "sum_self":
        self_value = torch.full((n,), 1.0 + stage.eps, device=src.device)
        return torch.cat([dst, loops]), torch.cat([src, loops]), torch.cat([weight, self_value]), n
    degree = torch.zeros(n, device=src.device).index_add(0, dst, weight)
    degree = torch.where(degree > 0, degree, torch.ones_like(degree))
    value = weight / degree[dst]
    return torch.cat([dst, loops]), torch.cat([src, loops + n]), torch.cat([value, torch.ones(n, device=src.device)]), 2 * n


def _gcn_coo(src: Tensor, dst: Tensor, weight: Tensor, n: int, remaining_loops: bool):
    """(row, col, value, n) of D^-1/2 (A_w + L) D^-1/2 with one self-loop entry per node appended.

    ``remaining_loops=False`` (the zoo's ``gcn_normalize``): L = I, existing self loops stay
    ordinary edges. ``True`` (PyG's ``gcn_norm`` with ``add_remaining_self_loops``): existing
    self loops count as absent (their entries get value 0) and their weight replaces the unit
    loop of their node. Entries stay one per edge, then one per node (see
    :meth:`Pattern.from_in_edges`). O(n + E), differentiable w.r.t. ``weight`` [E]."""
    loop_weight = torch.ones(n, device=src.device, dtype=weight.dtype)
    if remaining_loops:
        is_loop = src == dst
        if bool(is_loop.any()):
            loop_weight = loop_weight.index_put((src[is_loop],), weight[is_loop])
            weight = weight.masked_fill(is_loop, 0.0)
    degree = loop_weight.index_add(0, dst, weight)
    inv_sqrt = degree.pow(-0.5).masked_fill(degree == 0, 0.0)
    loops = torch.arange(n, device=src.device)
    value = torch.cat([inv_sqrt[src] * weight * inv_sqrt[dst], inv_sqrt * loop_weight * inv_sqrt])
    return torch.cat([dst, loops]), torch.cat([src, loops]), value, n


class FastEngine:
    """Fused-kernel engine for a lowered program (see ReferenceEngine for the arguments)."""

    def __init__(self, program: Program, backend: str, model: nn.Module, sub: Subgraph,
                 target: Tensor, joint: bool):
        self.program, self.name, self.model, self.sub = program, backend, model, sub
        self.layer = program.layer
        self.kernels = {op: dispatch.get(op, backend) for op in dispatch.OPS}
        self.target = target.contiguous()
        self.component = (torch.zeros if joint else torch.arange)(target.shape[0], dtype=torch.long)
        self.scale = loss_scale(target, joint)
        self._patterns: dict = {}
        self._operators: dict = {}
        self._transposes = True  # patterns carry their transpose (the backward needs it)

    @classmethod
    def forward_only(cls, program: Program, backend: str, model: nn.Module) -> "FastEngine":
        """An engine for :meth:`all_activations` alone (no targets, no loss)."""
        engine = cls.__new__(cls)
        engine.program, engine.name, engine.model, engine.layer = program, backend, model, program.layer
        engine.kernels = {op: dispatch.get(op, backend) for op in dispatch.OPS}
        engine._patterns, engine._operators, engine._transposes = {}, {}, False
        return engine

    @torch.no_grad()
    def all_activations(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """The matched layer's activations of every node [n, d_l] through the lowered program:
        memory O(n d + E) (CSR aggregations; no per-edge message tensor)."""
        h = x
        for stage in self.program.stages:
            h = self._propagate(stage, h, self._transform(stage, h, None),
                                self._operator(stage, edge_index, edge_weight, x.shape[0]))
        return h

    def activations(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """Layer-l activations at the targets [T, d_l] (no gradient needed: reference path)."""
        return layer_output(self.model, self.layer, x, edge_index, edge_weight,
                            forward_kwargs=self.sub.forward_kwargs)[self.sub.center]

    def losses(self, x: Tensor | BinaryRows, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """L_act per problem [C], differentiable w.r.t. ``x`` [m, d] and ``edge_weight`` [E].

        ``x`` may be :class:`~fastmetamer.engines.csr.BinaryRows` (binary features by their
        ones): the first dense product then gathers weight rows instead of multiplying by the
        dense 0/1 matrix, and the gradient goes to the optimised rows only."""
        stages = self.program.stages
        sparse = x if isinstance(x, BinaryRows) else None
        n = x.shape[0]
        h = x if sparse is None else (F.binary_dense(sparse) if stages[0].residual is not None else None)
        for i, stage in enumerate(stages):
            operator = self._operator(stage, edge_index, edge_weight, n)
            inputs = self._transform(stage, h, sparse if i == 0 else None)
            if i == len(stages) - 1:
                return self._matched(stage, h, inputs, operator)
            h = self._propagate(stage, h, inputs, operator)
        raise AssertionError("a program has at least one stage")

    def _operator(self, stage: Stage, edge_index: Tensor, edge_weight: Tensor | None, n: int) -> Operator:
        """The stage's operator for these edges. One pattern and one operator are cached per kind
        of stage (bounded memory), reused while the same edge tensors come back."""
        if not stage.weighted:
            edge_weight = None
        cache_key = (stage.operator, stage.eps)
        cached = self._operators.get(cache_key)
        if cached is not None and cached[0] is edge_index and cached[1] is edge_weight:
            return cached[2]
        row, col, value, num_cols = _coo(stage, edge_index, edge_weight, n)
        known = self._patterns.get(stage.operator)
        if known is None or known[0] is not edge_index:
            pattern = Pattern.from_in_edges(in_edges(edge_index, n), row, col, num_cols, transpose=self._transposes)
            known = (edge_index, pattern)
            self._patterns[stage.operator] = known
        operator = Operator.build(known[1], value.float())
        if edge_weight is None or not edge_weight.requires_grad:
            self._operators[cache_key] = (edge_index, edge_weight, operator)
        return operator

    def _transform(self, stage: Stage, h: Tensor | None, sparse: BinaryRows | None) -> Tensor:
        """The aggregation's input: h @ weight (stacked with h @ root_weight when present)."""
        if stage.root_weight is None:
            return h @ stage.weight if sparse is None else F.binary_linear(sparse, stage.weight, self.kernels)
        if sparse is None:
            return torch.cat([h @ stage.weight, h @ stage.root_weight])
        # one gather and one backward GEMM for both weights, then stack the halves
        both = F.binary_linear(sparse, self._joined(stage), self.kernels)
        width = stage.weight.shape[1]
        return torch.cat([both[:, :width], both[:, width:]])

    def _joined(self, stage: Stage) -> Tensor:
        """[weight | root_weight] [d, 2f], cached per stage."""
        key = ("joined", id(stage))
        known = self._patterns.get(key)
        if known is None or known[0] is not stage:
            known = (stage, torch.cat([stage.weight, stage.root_weight], dim=1).contiguous())
            self._patterns[key] = known
        return known[1]

    def _residual(self, stage: Stage, h: Tensor) -> Tensor | None:
        if stage.residual is None:
            return None
        return h if isinstance(stage.residual, str) else h @ stage.residual

    def _propagate(self, stage: Stage, h: Tensor, inputs: Tensor, operator: Operator) -> Tensor:
        if stage.fused_epilogue:
            return F.aggregate(inputs, operator, self.kernels, stage.bias, stage.act, self._residual(stage, h))
        out = F.aggregate(inputs, operator, self.kernels, stage.bias, stage.act)
        return self._post(stage, out, h)

    def _post(self, stage: Stage, out: Tensor, h: Tensor) -> Tensor:
        from ..ops.activations import apply

        for dense in stage.post:
            out = apply(out @ dense.weight + (0 if dense.bias is None else dense.bias), dense.act)
        residual = self._residual(stage, h)
        return out if residual is None else out + residual

    def _matched(self, stage: Stage, h: Tensor, inputs: Tensor, operator: Operator) -> Tensor:
        rows = self._target_operator(operator)
        if stage.fused_epilogue and stage.residual is None:
            return F.matched_loss(inputs, rows, self.kernels, self.target, self.component,
                                  self.scale, stage.bias, stage.act)
        out = F.aggregate(inputs, rows, self.kernels, stage.bias, stage.act)
        center_h = h[self.sub.center] if stage.residual is not None else h
        diff = (self._post(stage, out, center_h) - self.target).pow(2).sum(1)
        return torch.zeros_like(self.scale).index_add(0, self.component, diff) / self.scale

    def _target_operator(self, operator: Operator) -> Operator:
        """The operator's rows at the targets (pattern cached with the operator's pattern; the
        whole operator cached too when its values carry no gradient)."""
        known = self._patterns.get("rows")
        if known is not None and known[0] is operator:
            return known[1]
        known = self._patterns.get("row_pattern")
        if known is None or known[0] is not operator.pattern:
            known = (operator.pattern, operator.pattern.rows(self.sub.center))
            self._patterns["row_pattern"] = known
        rows = known[1]
        # rows.order indexes coordinate-order values; recover them from the CSR-order values.
        coo_value = torch.empty_like(operator.value).index_put((operator.pattern.order,), operator.value)
        result = Operator.build(rows, coo_value)
        if not operator.value.requires_grad:
            self._patterns["rows"] = (operator, result)
        return result
