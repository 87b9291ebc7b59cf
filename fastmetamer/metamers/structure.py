"""Structure parameterisation (SPEC §2.2).

Within each component, the edges among the free nodes R are replaced by learned candidate pairs
(symmetric, no self loops) of which exactly B are on, B being the reference's number of
undirected edges within R. Each candidate has a logit; P = sigmoid(s * logit); the hard top-B
pairs are on; the model sees weights P + stopgrad(hard - P) on both directions of every
candidate. Edges touching the frozen boundary ring are kept as they are.

Candidates are *dense* (all pairs of R) while |R| <= ``dense_max_nodes``, and *block-sparse*
beyond (in the manner of PR-BCD): the current top-B pairs plus a random block of new pairs,
resampled every ``resample_every`` steps, so memory is O(B + block), never O(|R|^2).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..graph.subgraph import Subgraph


def _undirected_pairs(edge_index: Tensor) -> Tensor:
    """Distinct undirected pairs [2, P] (row < col) of an edge list, self loops dropped."""
    lo, hi = edge_index.min(0).values, edge_index.max(0).values
    keep = lo != hi
    return torch.unique(torch.stack([lo[keep], hi[keep]]), dim=1)


class _ComponentCandidates:
    """Candidate pairs and logits of one component."""

    def __init__(self, nodes: Tensor, budget: int, dense: bool, block: int,
                 generator: torch.Generator):
        self.nodes, self.budget, self.dense, self.block = nodes, budget, dense, block
        self.generator = generator
        m = nodes.numel()
        if dense:
            self.pairs = torch.triu_indices(m, m, offset=1, device=nodes.device)
        else:
            self.pairs = self._sample(self.block, exclude=None)
        self.logits = torch.randn(self.pairs.shape[1], generator=generator).to(nodes.device)

    def _sample(self, count: int, exclude: Tensor | None) -> Tensor:
        m = self.nodes.numel()
        draws = torch.randint(0, m, (2, 2 * count + 16), generator=self.generator).to(self.nodes.device)
        draws = draws[:, draws[0] != draws[1]]
        pairs = torch.unique(torch.stack([draws.min(0).values, draws.max(0).values]), dim=1)
        if exclude is not None and exclude.numel():
            key, old = pairs[0] * m + pairs[1], exclude[0] * m + exclude[1]
            pairs = pairs[:, ~torch.isin(key, old)]
        return pairs[:, torch.randperm(pairs.shape[1], generator=self.generator).to(pairs.device)[:count]]

    def resample(self, logits: Tensor) -> None:
        """Keep the current top-B pairs with their logits; draw a fresh random block whose
        logits start just below the kept ones."""
        top = torch.topk(logits, min(self.budget, logits.numel())).indices
        kept, kept_logits = self.pairs[:, top], logits[top]
        fresh = self._sample(self.block, exclude=kept)
        floor = kept_logits.min() if kept_logits.numel() else logits.new_zeros(())
        fresh_logits = floor - 0.1 * torch.rand(fresh.shape[1], generator=self.generator).to(floor.device).abs()
        self.pairs = torch.cat([kept, fresh], dim=1)
        self.logits = torch.cat([kept_logits, fresh_logits])


class StructureParam:
    """Learned edges among the free nodes of every component.

    Args:
        sub: the problem's graph (its edges among free nodes define the budgets).
        generators: one torch.Generator per component (reproducible, batch-independent).
        slope: s in P = sigmoid(s * logit).
        dense_max_nodes: largest |R| that gets all pairs as candidates.
        block_size: candidate block size in sparse mode (None: max(4 B, 4096); at least 2 B, so
            that every state holds exactly B edges).
        resample_every: steps between block resamples in sparse mode.
    """

    def __init__(self, sub: Subgraph, generators: list[torch.Generator], *, slope: float,
                 dense_max_nodes: int, block_size: int | None, resample_every: int):
        self.sub, self.slope, self.resample_every = sub, slope, resample_every
        src, dst = sub.edge_index
        inside = sub.free[src] & sub.free[dst] & (src != dst)
        self.fixed_index = sub.edge_index[:, ~inside]
        self.fixed_weight = None if sub.edge_weight is None else sub.edge_weight[~inside]
        ref_pairs = _undirected_pairs(sub.edge_index[:, inside])
        self.reference_pairs = ref_pairs.t()  # [sum B, 2], problem by problem
        pair_component = sub.component[ref_pairs[0]]
        self.parts = []
        for c in range(sub.num_components):
            nodes = ((sub.component == c) & sub.free).nonzero().flatten()
            budget = int((pair_component == c).sum())
            total = nodes.numel() * (nodes.numel() - 1) // 2
            block = min(total, max(block_size or max(4 * budget, 4096), 2 * budget))  # room for B
            dense = nodes.numel() <= dense_max_nodes or block >= total
            self.parts.append(_ComponentCandidates(nodes, budget, dense, block, generators[c]))
        self.budgets = torch.tensor([p.budget for p in self.parts], device=self.fixed_index.device)
        self._build_params()

    def _build_params(self) -> None:
        self.params = [torch.cat([p.logits for p in self.parts]).requires_grad_()]
        sizes = torch.tensor([p.logits.numel() for p in self.parts], device=self.fixed_index.device)
        self._ptr = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        self._pairs = torch.cat([p.nodes[p.pairs] for p in self.parts], dim=1)
        # fixed between resamples, so the fast engine keeps its sparsity pattern (weights are values)
        self._index = torch.cat([self.fixed_index, self._pairs, self._pairs.flip(0)], dim=1)
        self._entry_component = torch.repeat_interleave(torch.arange(len(self.parts), device=sizes.device), sizes)

    def parameter_components(self) -> list[Tensor]:
        """For the logit tensor, the component owning each entry."""
        return [self._entry_component]

    def maybe_resample(self, step: int, active: Tensor) -> bool:
        """Resample the blocks of active sparse components; True if the parameters changed."""
        if step == 0 or step % self.resample_every:
            return False
        sparse = [c for c, p in enumerate(self.parts) if not p.dense and active[c]]
        if not sparse:
            return False
        logits = self.params[0].detach()
        for c, part in enumerate(self.parts):
            part.logits = logits[self._ptr[c]:self._ptr[c + 1]].clone()
            if c in sparse:
                part.resample(part.logits)
        self._build_params()
        return True

    def _hard(self, prob: Tensor) -> Tensor:
        """1 for the B_c most probable candidates of every component c (ties: lower index), else 0."""
        order = torch.argsort(prob, descending=True, stable=True)
        order = order[torch.argsort(self._entry_component[order], stable=True)]
        component = self._entry_component[order]
        rank = torch.arange(order.numel(), device=order.device) - self._ptr[component]
        hard = torch.zeros_like(prob)
        hard[order[rank < self.budgets[component]]] = 1.0
        return hard

    def edges(self) -> tuple[Tensor, Tensor]:
        """(edge_index [2, E_fixed + 2K], straight-through edge weights [E_fixed + 2K])."""
        prob = torch.sigmoid(self.slope * self.params[0])
        hard = self._hard(prob.detach())
        self._chosen = self._pairs[:, hard.bool()].t()
        weight = prob + (hard - prob).detach()
        fixed = self.fixed_weight if self.fixed_weight is not None else weight.new_ones(
            self.fixed_index.shape[1])
        return self._index, torch.cat([fixed, weight, weight])

    @property
    def state_owner(self) -> Tensor:
        """[sum B] the component of each row of :meth:`current_state`."""
        return torch.repeat_interleave(torch.arange(len(self.parts), device=self.budgets.device), self.budgets)

    def current_state(self) -> Tensor:
        """The chosen pairs [sum B, 2] (local ids, component by component) of the last forward."""
        return self._chosen

    def edges_of(self, chosen: Tensor) -> tuple[Tensor, Tensor | None]:
        """The metamer's edges for chosen pairs [sum B, 2]: the fixed edges plus both directions of
        every chosen pair ([2, E]), and their weights (None when the reference had none)."""
        pairs = chosen.t()
        index = torch.cat([self.fixed_index, pairs, pairs.flip(0)], dim=1)
        if self.fixed_weight is None:
            return index, None
        return index, torch.cat([self.fixed_weight, self.fixed_weight.new_ones(2 * pairs.shape[1])])
