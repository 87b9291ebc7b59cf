"""Feature parameterisations (SPEC §2.1).

The free rows of X (the receptive field R of each component) are replaced by a learned X';
other rows stay at the reference. Statistics (mean, std, range, density) are per component,
so a batch of independent problems behaves exactly like separate calls.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from ..graph.neighbourhood import expand_ranges
from ..graph.subgraph import Subgraph


LOGIT_BOUND = 4.0  # |s * X_soft| bound for binary features: P stays in [0.018, 0.982]


@dataclass
class FeatureStats:
    """Per-component reference statistics over the free rows: each [C, d] (density: [C])."""

    mean: Tensor
    std: Tensor
    low: Tensor
    high: Tensor
    ones: Tensor  # [C] number of ones (binary features) in the component's free rows


MIN_STAT_NODES = 8  # receptive fields smaller than this take mean, std and range from the graph
ROW_BLOCK = 1024  # rows per block of the passes over [rows, d] that need a temporary of that shape


def _row_blocks(rows: int):
    """(start, stop) of consecutive blocks of at most ROW_BLOCK rows covering [0, rows)."""
    return ((a, min(rows, a + ROW_BLOCK)) for a in range(0, rows, ROW_BLOCK))


def ones_per_row(x: Tensor) -> Tensor:
    """[rows] int64: how many entries of each row of x [rows, d] are > 0.5 (the ones of binary
    features), a block of rows at a time (no [rows, d] temporary to allocate)."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    buf = x.new_empty(min(ROW_BLOCK, x.shape[0]), x.shape[1], dtype=torch.float32)
    for a, b in _row_blocks(x.shape[0]):
        out[a:b] = torch.gt(x[a:b], 0.5, out=buf[:b - a]).sum(1)  # 0/1 sums: exact below 2^24 features
    return out


def _sums_of_squares(x: Tensor, comp: Tensor, c: int) -> Tensor:
    """[c, d] sums of x * x [rows, d] over the rows of each component ``comp`` [rows] (added in row
    order, as one index_add_), a block of rows at a time."""
    total = x.new_zeros(c, x.shape[1])
    buf = x.new_empty(min(ROW_BLOCK, x.shape[0]), x.shape[1])
    for a, b in _row_blocks(x.shape[0]):
        total.index_add_(0, comp[a:b], torch.mul(x[a:b], x[a:b], out=buf[:b - a]))
    return total


def feature_stats(sub: Subgraph, population: Tensor | None = None) -> FeatureStats:
    """Mean, population std, min, max and count of ones of the reference over each R.

    A receptive field of fewer than MIN_STAT_NODES nodes (a 0-hop layer: R is the target alone)
    says little about the feature distribution; its mean, std and range come from
    ``population`` [N, d] (the whole graph's features) instead, so the metamer does not start
    at the reference. The number of ones always comes from R."""
    x, comp = (sub.x, sub.component) if bool(sub.free.all()) else (sub.x[sub.free], sub.component[sub.free])
    c, d = sub.num_components, x.shape[1]
    nodes = torch.bincount(comp, minlength=c)
    count = nodes.clamp_min(1).unsqueeze(1).to(x.dtype)
    mean = x.new_zeros(c, d).index_add_(0, comp, x) / count
    sq = _sums_of_squares(x, comp, c) / count
    index = comp.unsqueeze(1).expand_as(x)
    low = x.new_full((c, d), float("inf")).scatter_reduce(0, index, x, "amin")
    high = x.new_full((c, d), float("-inf")).scatter_reduce(0, index, x, "amax")
    ones = torch.zeros(c, dtype=torch.long, device=x.device).index_add_(0, comp, ones_per_row(x))
    stats = FeatureStats(mean, (sq - mean * mean).clamp_min(0).sqrt(), low, high, ones)
    small = nodes < MIN_STAT_NODES
    if population is not None and small.any():
        whole = (population.mean(0), population.std(0, unbiased=False), population.min(0).values,
                 population.max(0).values)
        for field, value in zip(("mean", "std", "low", "high"), whole):
            getattr(stats, field)[small] = value
    return stats


#: Noise entries from which components are drawn on several threads (starting a thread pool
#: costs about 0.4 ms, one draw about 7 ns: measured on a 2-core Zen 3).
PARALLEL_NOISE_ENTRIES = 1 << 17


def draw_noise(ptr: Tensor, dim: int, generators: list[torch.Generator], out: Tensor | None = None,
               components: list[int] | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Standard-normal noise [F, dim] for the free rows, component c's rows ``ptr[c]:ptr[c+1]``
    drawn from ``generators[c]`` (so a batched problem draws what a single call would, on any
    device: the CPU generators draw and the rows are copied to ``device``). With ``out`` and
    ``components``, redraws only those components' rows of ``out`` in place. Components are
    drawn on up to ``torch.get_num_threads()`` threads at once (each generator on one thread:
    the same numbers), since one generator's stream is serial."""
    bounds = ptr.tolist()
    if out is None:
        out = torch.empty(bounds[-1], dim, device=device)
        components = list(range(len(generators)))
    rows = [out[bounds[c]:bounds[c + 1]] for c in components]
    chosen = [generators[c] for c in components]
    workers = min(len(rows), torch.get_num_threads())
    if workers > 1 and sum(r.numel() for r in rows) >= PARALLEL_NOISE_ENTRIES:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(_draw_into, rows, chosen))
    else:
        for r, g in zip(rows, chosen):
            _draw_into(r, g)
    return out


def _draw_into(rows: Tensor, generator: torch.Generator) -> None:
    """Overwrites ``rows`` with standard-normal draws from ``generator`` (on the CPU)."""
    if rows.device.type == "cpu" and rows.dtype == torch.get_default_dtype():  # drawn in place
        torch.randn(rows.shape, generator=generator, out=rows)
    else:
        rows.copy_(torch.randn(rows.shape, generator=generator))


class FeatureParam:
    """Learned features of the free rows.

    Args:
        sub: the problem's graph.
        noise: [F, d] standard-normal draws for the free rows (F = number of free nodes).
        binary: straight-through top-rho binary features (else continuous with clipping).
        size_independent: learn only the per-component mean and std (noise fixed).
        per_row: binary mode keeps each node's own number of ones instead of the density of R.
        slope: s in P = sigmoid(s * X_soft).
        margin, margin_weight: m and lambda of the margin term mean(relu(m - |P - t|)).
        population: the whole graph's features [N, d] (statistics of tiny receptive fields).
        stats, noise: given instead of computed from ``sub`` and drawn from ``generators`` (a
            partitioned whole graph's share of them, see :mod:`.partitioned`).
    """

    def __init__(self, sub: Subgraph, generators: list[torch.Generator], *, binary: bool,
                 size_independent: bool, per_row: bool, slope: float, margin: float, margin_weight: float,
                 population: Tensor | None = None, stats: FeatureStats | None = None, noise: Tensor | None = None):
        self.sub, self.generators = sub, generators
        self.binary, self.size_independent, self.per_row = binary, size_independent, per_row
        self.slope, self.margin, self.margin_weight = slope, margin, margin_weight
        self.stats = feature_stats(sub, population) if stats is None else stats
        self.free_component = sub.component[sub.free]
        self.ptr = sub.free_ptr()
        self.component_rows = self.ptr.diff()  # free rows per component (the margin term's mean)
        self.row_ones = ones_per_row(sub.x[sub.free])
        self.noise = (draw_noise(self.ptr, sub.x.shape[1], generators, device=sub.x.device) if noise is None
                      else noise).to(sub.x.dtype)
        if size_independent:
            self.params = [self.stats.mean.clone().requires_grad_(),
                           self.stats.std.clone().requires_grad_()]
        else:
            self.params = [self._start().requires_grad_()]

    def _start(self) -> Tensor:
        return self.stats.mean[self.free_component] + self.stats.std[self.free_component] * self.noise

    def restart(self, stalled: Tensor) -> None:
        """Start the ``stalled`` [C] components again from a fresh draw of their noise."""
        comps = stalled.nonzero().flatten().tolist()
        draw_noise(self.ptr, self.noise.shape[1], self.generators, self.noise, comps)
        with torch.no_grad():
            if self.size_independent:
                self.params[0][comps] = self.stats.mean[comps]
                self.params[1][comps] = self.stats.std[comps]
            else:
                self.params[0].copy_(torch.where(stalled[self.free_component].unsqueeze(1), self._start(),
                                                 self.params[0]))

    @property
    def state_owner(self) -> Tensor:
        """[F] the component of each row of :meth:`current_state`."""
        return self.free_component

    def current_state(self) -> Tensor:
        """X' of the free rows [F, d] as the model saw it at the last forward (hard 0/1 rows for
        binary features)."""
        return self._last

    def parameter_components(self) -> list[Tensor]:
        """For each parameter tensor, the component owning each of its rows."""
        if self.size_independent:
            comps = torch.arange(self.sub.num_components, device=self.sub.x.device)
            return [comps, comps]
        return [self.free_component]

    def soft(self) -> Tensor:
        """X_soft [F, d]: the unconstrained free-row features."""
        if self.size_independent:
            mean, std = self.params
            return mean[self.free_component] + std[self.free_component] * self.noise
        return self.params[0]

    def free_values(self) -> tuple[Tensor, Tensor]:
        """(X' [F, d] as the model sees it, with gradient path; extra loss term, a scalar)."""
        x_soft = self.soft()
        if not self.binary:
            lo, hi = self.stats.low[self.free_component], self.stats.high[self.free_component]
            clipped = torch.minimum(torch.maximum(x_soft, lo), hi)
            self._last = clipped.detach()
            return clipped, x_soft.new_zeros(())
        prob = torch.sigmoid(self.slope * x_soft)
        hard, threshold = self._top_mask(prob.detach())
        self._last = hard
        return prob + (hard - prob).detach(), self.margin_weight * self._margin(prob, threshold)

    def _margin(self, prob: Tensor, threshold: Tensor) -> Tensor:
        """Sum over components of mean(relu(m - |P - t|)) over the component's entries."""
        per_row = torch.relu(self.margin - (prob - threshold).abs()).sum(1)
        per_comp = per_row.new_zeros(self.sub.num_components).index_add(0, self.free_component, per_row)
        return (per_comp / (self.component_rows.clamp_min(1) * prob.shape[1])).sum()

    def _top_mask(self, prob: Tensor) -> tuple[Tensor, Tensor]:
        """Hard 0/1 mask of the largest entries (per component or per row) and the threshold
        t between the selected and unselected values, broadcastable to ``prob``."""
        if self.per_row:
            return _row_top_mask(prob, self.row_ones)
        hard = torch.zeros_like(prob)
        threshold = prob.new_empty(prob.shape[0], 1)
        for c in range(self.sub.num_components):
            rows = slice(int(self.ptr[c]), int(self.ptr[c + 1]))
            block_hard, t = _flat_top_mask(prob[rows], int(self.stats.ones[c]))
            hard[rows], threshold[rows] = block_hard, t
        return hard, threshold

    def features(self) -> tuple[Tensor, Tensor]:
        """(X' [m, d] for the whole problem graph, extra loss scalar)."""
        free_x, extra = self.free_values()
        x = self.sub.x.clone()
        x[self.sub.free] = free_x
        return x, extra

    def project(self) -> None:
        """After a step: clip continuous features to the reference per-feature range; keep
        binary logits within |s * X_soft| <= LOGIT_BOUND so the sigmoid never saturates (a
        saturated P would stop the straight-through gradient for good)."""
        if self.size_independent:
            return
        with torch.no_grad():
            if self.binary:
                self.params[0].clamp_(-LOGIT_BOUND / self.slope, LOGIT_BOUND / self.slope)
                return
            p = self.params[0]
            p.copy_(torch.minimum(torch.maximum(p, self.stats.low[self.free_component]),
                                  self.stats.high[self.free_component]))


def _flat_top_mask(prob: Tensor, k: int) -> tuple[Tensor, Tensor]:
    flat = prob.reshape(-1)
    hard = torch.zeros_like(flat)
    if k <= 0:
        return hard.view_as(prob), flat.max() + 1e-6
    if k >= flat.numel():
        return torch.ones_like(prob), flat.min() - 1e-6
    values, order = torch.sort(flat, descending=True, stable=True)  # ties in memory order, as the kernels
    hard[order[:k]] = 1.0
    return hard.view_as(prob), 0.5 * (values[k - 1] + values[k])


def _row_top_mask(prob: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    values, order = prob.sort(dim=1, descending=True, stable=True)
    rank = torch.arange(prob.shape[1], device=prob.device).expand_as(prob)
    hard = torch.zeros_like(prob).scatter_(1, order, (rank < counts.unsqueeze(1)).to(prob.dtype))
    # thresholds max P + 1e-6 (k = 0) and min P - 1e-6 (k = d), as the update ops' contract
    padded = torch.cat([values[:, :1] + 2e-6, values, values[:, -1:] - 2e-6], dim=1)
    k = counts.unsqueeze(1)
    threshold = 0.5 * (padded.gather(1, k) + padded.gather(1, k + 1))
    return hard, threshold


def _scaled_by_component(noise: Tensor, stats: FeatureStats, ptr: Tensor) -> Tensor:
    """``noise`` [F, d] (in place) times the std and plus the mean of each row's component, the
    rows of component c being ``ptr[c]:ptr[c+1]`` (one broadcast per component, no [F, d] gather)."""
    bounds = ptr.tolist()
    for c in range(len(bounds) - 1):
        rows = noise[bounds[c]:bounds[c + 1]]
        rows.mul_(stats.std[c]).add_(stats.mean[c])
    return noise


class FusedBinaryFeatures:
    """Binary straight-through features stepped by the fused update kernels.

    The same mathematics as :class:`FeatureParam` (binary, full mode) followed by the
    optimiser's masked Adam, but the selection (``top_mask``) and the whole elementwise update
    (sigmoid, margin term, straight-through chain rule, Adam, masking) each run as one fused op
    of ``kernels``. ``features()`` gives X' by its ones (free rows only), so the fast engine
    gathers weight rows instead of multiplying by the dense 0/1 matrix and back-propagates to
    the free rows only.
    """

    params: list[Tensor] = []

    def __init__(self, sub: Subgraph, generators: list[torch.Generator], kernels, schedule, *,
                 per_row: bool, slope: float, margin: float, margin_weight: float,
                 population: Tensor | None = None, fixed_edges: bool = True, stats: FeatureStats | None = None,
                 noise: Tensor | None = None, component_rows: Tensor | None = None):
        self.sub, self.kernels, self.schedule = sub, kernels, schedule
        self.binary, self.slope, self.margin = True, slope, margin
        stats = feature_stats(sub, population) if stats is None else stats
        self.free_rows = sub.free.nonzero().flatten()
        self.rows = None if bool(sub.free.all()) else self.free_rows
        frozen_rows = (~sub.free).nonzero().flatten()
        if fixed_edges or frozen_rows.numel() == 0:
            self.frozen = None
        else:
            row, col = (sub.x[frozen_rows] > 0.5).nonzero().unbind(1)
            self.frozen = (frozen_rows[row], col)
        self.row_component = sub.component[sub.free]
        ptr = sub.free_ptr()
        self.generators, self.stats, self.comp_ptr = generators, stats, ptr
        noise = draw_noise(ptr, sub.x.shape[1], generators, device=sub.x.device) if noise is None else noise
        self.theta = _scaled_by_component(noise, stats, ptr)
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.theta), torch.zeros_like(self.theta)
        # dL/dX'[free], written whole by the engine's backward when a contribution is not left as a
        # product for the fused update (empty: its pages are only touched then)
        self.grad = torch.empty_like(self.theta)
        self.token = torch.zeros((), requires_grad=True, device=self.theta.device)
        if per_row:
            self.ptr = torch.arange(self.theta.shape[0] + 1, device=self.theta.device)
            self.k = ones_per_row(sub.x[sub.free])
        else:
            self.ptr, self.k = ptr, stats.ones
        entries = (ptr.diff() if component_rows is None else component_rows).clamp_min(1) * self.theta.shape[1]
        self.margin_scale = (margin_weight / entries.to(self.theta.dtype))[self.row_component].contiguous()
        self.steps = 0

    def features(self) -> tuple:
        """(X' as :class:`~fastmetamer.engines.csr.BinaryRows`: the ones of the free rows, with
        the gradient buffer [F, d] that backward fills; the frozen rows count as zero, which is
        exact while the edges stay fixed (they lie outside the receptive field), else their ones
        are included. A zero penalty: the margin term is applied inside the fused update)."""
        from ..engines.csr import BinaryRows

        rowptr, col, self.threshold = self._select()
        self._ones = (rowptr, col)
        self._x = BinaryRows.from_csr(rowptr, col, self.rows, self.sub.num_nodes, self.grad, self.token,
                                      self.frozen, defer=True)
        return self._x, self.theta.new_zeros(())

    def _select(self) -> tuple[Tensor, Tensor, Tensor]:
        """The ones of the top-rho selection (rowptr [F + 1], col [nnz]) and the rows' thresholds [F]."""
        return self.kernels.top_mask_csr(self.theta, self.ptr, self.k, self.slope)

    def fused_step(self, lr: float, active: Tensor) -> None:
        """One fused straight-through + margin + Adam step from the gradient the backward left
        (in ``self.grad``, and as the first layer's product still to form; none: no path from
        these features to the loss), then the projection of :meth:`FeatureParam.project` in the
        same pass: every row's logits (active or not) clamped to |s * theta| <= LOGIT_BOUND."""
        x = self._x
        self.steps += 1
        beta1, beta2 = self.schedule.betas
        self.kernels.adam_ste_update(
            self.theta, self.grad if x.written else None, self.exp_avg, self.exp_avg_sq, step=self.steps, lr=lr,
            beta1=beta1, beta2=beta2, eps=self.schedule.eps, slope=self.slope, threshold=self.threshold,
            margin=self.margin, margin_scale=self.margin_scale, active=active[self.row_component],
            bound=LOGIT_BOUND / self.slope, grad_product=None if x.pending is None else x.pending[:2])

    def restart(self, stalled: Tensor) -> None:
        """Start the ``stalled`` [C] components again from a fresh draw, with fresh moments."""
        comps = stalled.nonzero().flatten().tolist()
        noise = draw_noise(self.comp_ptr, self.theta.shape[1], self.generators, torch.zeros_like(self.theta), comps)
        rows = stalled[self.row_component]
        start = (self.stats.mean[self.row_component] + self.stats.std[self.row_component] * noise).clamp(
            -LOGIT_BOUND / self.slope, LOGIT_BOUND / self.slope)
        for tensor, value in ((self.theta, start), (self.exp_avg, 0.0), (self.exp_avg_sq, 0.0)):
            tensor[rows] = value if isinstance(value, float) else value[rows]

    @property
    def state_owner(self) -> Tensor:
        """[F] the component of each row of :meth:`current_state`."""
        return self.row_component

    def current_state(self) -> Tensor:
        """The hard 0/1 free rows [F, d] the model saw at the last forward."""
        return self.dense_state(self._ones)

    def dense_state(self, ones: tuple[Tensor, Tensor]) -> Tensor:
        """The 0/1 rows [F, d] whose ones are ``ones`` = (rowptr [F + 1], col [nnz])."""
        rowptr, col = ones
        row = torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=col.device), rowptr.diff(),
                                      output_size=col.numel())
        return torch.zeros_like(self.theta).index_put_((row, col), self.theta.new_ones(col.numel()))

    def best_ones(self, best: tuple[Tensor, Tensor] | None, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The ones (rowptr [F + 1], col [nnz]) of a best state ``best`` (None: none yet) with the
        rows ``rows`` [F] bool taken from the last forward: O(F + nnz), no dense [F, d] pass and no
        host read. ``rows`` covers whole components, and the selection keeps each component's
        number of ones, so the result has as many ones as the last forward (each forward's
        ones are fresh tensors, never written in place, so they can be kept as they are)."""
        rowptr, col = self._ones
        if best is None:
            return rowptr, col
        best_ptr, best_col = best
        counts = torch.where(rows, rowptr.diff(), best_ptr.diff())
        starts = torch.where(rows, rowptr[:-1], best_ptr[:-1] + col.numel())
        _, index = expand_ranges(starts, counts, total=col.numel())
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)]), torch.cat([col, best_col])[index]
