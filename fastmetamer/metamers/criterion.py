"""The success criterion of SPEC §2.3: beat the null distribution of natural pairs.

A metamer of target v passes when its layer-l activation is closer (Euclidean) to v's reference
activation than the activation of any other real node of the graph is. Nodes whose activation
equals v's (twins: identical neighbourhoods) are left out of the null distribution and counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..graph.neighbourhood import expand_ranges


@dataclass
class NullDistances:
    """Per target: the smallest distance to another real node's activation, and the twins.

    Attributes:
        threshold: [T] min_u ||H[u] - H[v]|| over real nodes u != v that are not twins
            (inf when there is none).
        twins: [T] number of other nodes whose activation equals v's (within ``rtol``).
    """

    threshold: Tensor
    twins: Tensor


def null_distances(null_acts: Tensor, null_ids: Tensor, target_ids: Tensor, target_acts: Tensor,
                   rtol: float = 1e-6, chunk_entries: int = 1 << 22) -> NullDistances:
    """Null-distribution thresholds for targets ``target_ids`` [T] with activations [T, d],
    against real nodes ``null_ids`` [N] (distinct) with activations ``null_acts`` [N, d]. A
    target id of -1 marks a target that is not in the null set (e.g. a graph-level target).

    Exact in float64 without a float64 copy of the null set: a float32 matrix product gives every
    target-null distance within a rounding bound, and only the pairs that the bounds leave
    undecided (a possible twin, or possibly the nearest non-twin) are computed exactly.
    ``chunk_entries`` target-null pairs at a time (memory O(chunk_entries)); time O(T N d); a
    target's own entry in the null set is left out."""
    n = null_ids.numel()
    position = torch.full((int(max(null_ids.max(), target_ids.max())) + 1 if n else 1,), -1, dtype=torch.long,
                          device=null_ids.device)
    position[null_ids] = torch.arange(n, device=null_ids.device)
    own = torch.where(target_ids >= 0, position[target_ids.clamp_min(0)], -1) if n \
        else target_ids.new_full(target_ids.shape, -1)
    rows = max(1, chunk_entries // max(1, n))
    slack = _slack(null_acts.shape[1])
    null32 = null_acts.float()
    null_sq = null32.square().sum(1, dtype=torch.float64)
    # [-2 b, (1 - slack) |b|^2, 1]: one product with [a, 1, (1 - slack) |a|^2] gives lower bounds
    null_side = torch.cat([-2 * null32, ((1 - slack) * null_sq).float()[:, None], null32.new_ones(n, 1)], dim=1)
    thresholds, twins = [], []
    for start in range(0, target_ids.numel(), rows):
        acts = target_acts[start:start + rows].double()
        threshold, count = _nearest_in_null(acts, null_side, null_sq, null_acts, own[start:start + rows], rtol)
        thresholds.append(threshold)
        twins.append(count)
    return NullDistances(torch.cat(thresholds).float(), torch.cat(twins))


def _slack(d: int) -> float:
    """Relative rounding bound of a float32 product of d-dimensional activations: the squared
    distance it gives is within slack * (|a|^2 + |b|^2) of the exact one (GEMM rounding of d + 2
    terms, float32 inputs and squared norms; a factor of 3 to spare)."""
    return 8 * (d + 4) * 2.0 ** -24


def _nearest_in_null(acts: Tensor, null_side: Tensor, null_sq: Tensor, null_acts: Tensor, own: Tensor,
                     rtol: float) -> tuple[Tensor, Tensor]:
    """(distance [R] of each target's nearest non-twin in the null set, inf if none; twins [R])
    for target activations ``acts`` [R, d] float64; ``own`` [R]: the target's own null position
    or -1. One float32 product gives a lower bound of every squared distance; the nearest by
    that bound is measured exactly, and only the pairs whose bound does not exceed both that
    distance and the twin radius are measured too (so that none can be a twin or nearer)."""
    r, n = acts.shape[0], null_side.shape[0]
    if n == 0:
        return acts.new_full((r,), float("inf")), torch.zeros(r, dtype=torch.long, device=acts.device)
    slack = _slack(acts.shape[1])
    acts_sq = acts.square().sum(1)
    target_side = torch.cat([acts.float(), null_side.new_ones(r, 1), ((1 - slack) * acts_sq).float()[:, None]], dim=1)
    low = target_side @ null_side.T  # <= the exact squared distance
    mine, has_own = torch.arange(r, device=acts.device), own >= 0
    low[mine[has_own], own[has_own]] = float("inf")  # the target itself is never its own neighbour
    twin2 = (rtol * acts.norm(dim=1).clamp_min(1e-30)).square()
    guess = low.argmin(1)
    reach = (acts - null_acts[guess].double()).square().sum(1)  # a squared distance that exists
    reach = torch.where((reach > twin2) & (low[mine, guess] < float("inf")), reach, torch.full_like(reach, float("inf")))
    twinned = torch.isinf(reach).nonzero().flatten()  # rows whose guess is a twin (or themselves): bound the others
    if twinned.numel():
        part = low[twinned].double()
        high = part + 3 * slack * (acts_sq[twinned, None] + null_sq[None, :]) + 1e-300
        sure_other = part > twin2[twinned, None]
        reach[twinned] = torch.where(sure_other, high, torch.full_like(high, float("inf"))).min(1).values
    undecided = low <= torch.maximum(twin2, reach)[:, None].float() * (1 + 2.0 ** -20)
    undecided[mine[has_own], own[has_own]] = False
    row, col = undecided.nonzero(as_tuple=True)
    exact = (acts[row] - null_acts[col].double()).norm(dim=1)
    twin = exact <= twin2[row].sqrt()
    count = torch.zeros(r, dtype=torch.long, device=acts.device).index_add_(0, row[twin], torch.ones_like(row[twin]))
    nearest = acts.new_full((r,), float("inf")).scatter_reduce(0, row[~twin], exact[~twin], "amin")
    return nearest, count


def passes(metamer_acts: Tensor, target_acts: Tensor, null: NullDistances) -> tuple[Tensor, Tensor]:
    """(passed [T] bool, distance [T]): ||h'_v - h_v|| < threshold_v."""
    distance = (metamer_acts.double() - target_acts.double()).norm(dim=1).float()
    return distance < null.threshold, distance


def whole_graph_passes(acts: Tensor, metamer_acts: Tensor, rtol: float = 1e-6,
                       chunk_entries: int = 1 << 21,
                       queries: Tensor | None = None) -> tuple[Tensor, Tensor, NullDistances]:
    """The criterion for every node of a whole-graph metamer as a range query (SPEC §2.3), in
    time O(n log n + n d + d * pairs examined) instead of the O(n² d) of all nearest neighbours
    (computed instead on graphs of at most 4,096 nodes, where they cost less: a bounded O(1)).

    Node v passes when no other real node u that is not a twin of v (||h_u - h_v|| <= rtol ||h_v||)
    lies within the metamer's distance r_v = ||h'_v - h_v|| of h_v. Nodes are sorted by their
    projection p on the principal direction of ``acts``; |p_u - p_v| <= ||h_u - h_v|| prunes every
    u outside v's window, and the survivors are checked exactly in float64, nearest first, until a
    witness (a non-twin within r_v) is found or the window is exhausted.

    Args:
        acts: reference activations H [n, d]; metamer_acts: H' [n, d].
        chunk_entries: float64 entries (pairs x d) of one exact-distance chunk (memory bound).
        queries: the nodes [q] to decide (default: all); every node still counts as a neighbour
            (a partitioned whole graph decides each rank's own nodes).

    Returns:
        (passed [q] bool, distance [q] = r_v, null) for the queried nodes: ``null.twins`` counts each node's twins
        exactly; ``null.threshold`` is a certificate, not the nearest distance: for a node that
        fails, the distance of a witness (<= r_v); for a node that passes, a lower bound on the
        nearest non-twin's distance that exceeds r_v (the nearest distance itself on small
        graphs). The flags equal the brute-force ones.
    """
    h = acts.double()
    nodes = torch.arange(h.shape[0], device=h.device) if queries is None else queries
    distance = (metamer_acts.double() - h).norm(dim=1)
    twin_radius = rtol * h.norm(dim=1).clamp_min(1e-30)
    if h.shape[0] ** 2 <= BRUTE_FORCE_PAIRS:
        nearest, twins = _all_nearest(h, twin_radius, chunk_entries)
        nearest, twins, distance = nearest[nodes], twins[nodes], distance[nodes]
        return nearest > distance, distance.float(), NullDistances(nearest.float(), twins)
    position, order, projected, coords = _principal_order(h)
    chunk_entries = max(1, chunk_entries // max(h.shape[1], 1))  # pairs per chunk
    twins = _count_twins(h, position, order, projected, twin_radius, chunk_entries, nodes)
    bound = _witness_search(h, coords, position, order, projected, distance, twin_radius, chunk_entries,
                            nodes)[nodes]
    distance = distance[nodes]
    return bound > distance, distance.float(), NullDistances(bound.float(), twins)


#: Below this many node pairs (n <= 4096) every distance is computed: on Cora (2,708 nodes) that
#: takes 0.06 s against 0.4 s for the range query, whose windows are wide among close activations.
BRUTE_FORCE_PAIRS = 1 << 24


def _all_nearest(h: Tensor, twin_radius: Tensor, chunk_entries: int) -> tuple[Tensor, Tensor]:
    """(nearest [n]: each node's exact distance to its nearest non-twin, inf if none; twins [n])
    from every pairwise distance in float64 (differences, no matrix-product rounding), rows in
    chunks of ``chunk_entries`` distances."""
    n = h.shape[0]
    nearest = torch.empty(n, dtype=h.dtype, device=h.device)
    twins = torch.empty(n, dtype=torch.long, device=h.device)
    rows = max(1, chunk_entries // max(n, 1))
    for start in range(0, n, rows):
        dist = torch.cdist(h[start:start + rows], h, compute_mode="donot_use_mm_for_euclid_dist")
        mine = torch.arange(start, start + dist.shape[0], device=h.device)
        dist[torch.arange(dist.shape[0], device=h.device), mine] = float("inf")  # the node itself
        closest = dist.min(1).values if n > 1 else torch.full_like(mine, float("inf"), dtype=h.dtype)
        with_twins = (closest <= twin_radius[mine]).nonzero().flatten()  # the few rows that need a twin count
        twins[mine] = 0
        if with_twins.numel():
            rows_twins = dist[with_twins]
            is_twin = rows_twins <= twin_radius[mine[with_twins], None]
            twins[mine[with_twins]] = is_twin.sum(1)
            closest[with_twins] = rows_twins.masked_fill_(is_twin, float("inf")).min(1).values
        nearest[mine] = closest
    return nearest, twins


#: Principal directions whose projections give the cheap lower bounds of the range query.
BOUND_DIMS = 8


def _principal_order(h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(position [n]: rank of every node, order [n]: nodes by rank, projected [n]: sorted
    projections on the first principal direction, coords [n, k]: projections on the first
    k = min(BOUND_DIMS, d) principal directions). Any orthonormal directions give valid lower
    bounds ||V^T (h_u - h_v)|| <= ||h_u - h_v||; principal ones (of the covariance of at most
    65,536 evenly spaced rows, float64) make them tight."""
    rows = h[:: max(1, h.shape[0] // 65_536)]
    centred = rows - rows.mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    basis = vectors.flip(1)[:, :BOUND_DIMS]
    coords = h @ basis
    projected, order = torch.sort(coords[:, 0])
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return position, order, projected, coords


def _window(projected: Tensor, position: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """[lo, hi) ranks whose projection lies within ``radius`` of each node's (widened by a float64
    rounding margin so that pruning never drops a node that is within the radius)."""
    mine = projected[position]
    slack = 1e-12 * (projected.abs().max() + radius) + radius * 1e-9
    lo = torch.searchsorted(projected, mine - radius - slack, side="left")
    hi = torch.searchsorted(projected, mine + radius + slack, side="right")
    return lo, hi


def _pairs(lo: Tensor, hi: Tensor, nodes: Tensor, chunk_entries: int):
    """Yield (node [P], rank [P]) for every rank in [lo, hi) of ``nodes``, ``chunk_entries`` at a time."""
    counts = hi[nodes] - lo[nodes]
    ends = counts.cumsum(0)
    start = 0
    while start < nodes.numel():
        stop = int(torch.searchsorted(ends, ends[start] - counts[start] + chunk_entries, side="right"))
        stop = max(stop, start + 1)
        part = nodes[start:stop]
        which, rank = expand_ranges(lo[part], counts[start:stop])
        yield part[which], rank
        start = stop


def _count_twins(h, position, order, projected, twin_radius, chunk_entries, nodes: Tensor) -> Tensor:
    """[q] number of other nodes within ``twin_radius`` of each of ``nodes`` [q] (exact)."""
    lo, hi = _window(projected, position, twin_radius)
    twins = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    for owner, rank in _pairs(lo, hi, nodes, chunk_entries):
        other = order[rank]
        close = (other != owner) & ((h[other] - h[owner]).norm(dim=1) <= twin_radius[owner])
        twins.index_add_(0, owner[close], torch.ones_like(owner[close]))
    return twins[nodes]


def _witness_search(h, coords, position, order, projected, radius, twin_radius, chunk_entries,
                    nodes: Tensor) -> Tensor:
    """[n] for every node of ``nodes`` (the other entries are not searched): the distance of a
    non-twin within ``radius`` (a witness) if there is one, else a lower bound on the nearest
    non-twin's distance that exceeds ``radius``.

    Windows are scanned in rounds of growing width around each node's rank (nearest projections
    first), so a node that fails mostly stops at its first witness and a node that passes scans
    its (small) window; a pair's distance is computed exactly only where its lower bound from
    the k principal coordinates does not already put it out of reach. Nodes whose window stays
    wider than ``DENSE_WIDTH`` ranks (a large metamer distance) go on in the k principal
    coordinates' nearest-neighbour order (:func:`_tree_search`); the few it leaves open are
    finished by :func:`_dense_scan` against all nodes."""
    n = h.shape[0]
    reach = torch.maximum(radius, twin_radius)
    lo, hi = _window(projected, position, reach)
    reach = reach * (1 + 1e-9) + 1e-12 * (coords.abs().max() + reach)  # rounding margin of the bound
    best = torch.full((n,), float("inf"), dtype=h.dtype, device=h.device)  # nearest examined non-twin
    open_nodes, width = nodes, 8
    while open_nodes.numel() and width <= DENSE_WIDTH:
        here = position[open_nodes]
        lo_round = torch.maximum(lo[open_nodes], here - width)
        hi_round = torch.minimum(hi[open_nodes], here + width + 1)
        round_lo, round_hi = torch.zeros_like(lo), torch.zeros_like(hi)
        round_lo[open_nodes], round_hi[open_nodes] = lo_round, hi_round
        for owner, rank in _pairs(round_lo, round_hi, open_nodes, chunk_entries):
            other = order[rank]
            gap = (coords[other] - coords[owner]).norm(dim=1)  # a lower bound, exact where it may matter
            near = (gap <= reach[owner]).nonzero().flatten()
            gap[near] = (h[other[near]] - h[owner[near]]).norm(dim=1)
            real = (other != owner) & (gap > twin_radius[owner])
            best.scatter_reduce_(0, owner[real], gap[real], reduce="amin")
        done = (best[open_nodes] <= radius[open_nodes]) | ((lo_round == lo[open_nodes]) & (hi_round == hi[open_nodes]))
        open_nodes, width = open_nodes[~done], 4 * width
    floor = torch.full_like(best, float("inf"))  # a lower bound on every unexamined node's distance
    if open_nodes.numel():
        found, beyond, unresolved = _tree_search(h, coords, open_nodes, radius, twin_radius, reach)
        best[open_nodes], floor[open_nodes] = found, beyond
        open_nodes = open_nodes[unresolved]
    if open_nodes.numel():
        best[open_nodes] = _dense_scan(h, open_nodes, radius, twin_radius, chunk_entries)
    # nodes without a witness: every unexamined node lies beyond the window, at least its edge gap away
    mine = projected[position]
    left = torch.where(lo > 0, mine - projected[(lo - 1).clamp_min(0)], torch.full_like(mine, float("inf")))
    right = torch.where(hi < n, projected[hi.clamp_max(n - 1)] - mine, torch.full_like(mine, float("inf")))
    witnessed = best <= radius
    return torch.where(witnessed, best, torch.minimum(torch.minimum(best, floor), torch.minimum(left, right)))


#: Neighbours asked of the k-d tree per node and round (then 8x more for the nodes left open).
TREE_NEIGHBOURS = (32, 256, 2048)


def _tree_search(h, coords, nodes, radius, twin_radius, reach) -> tuple[Tensor, Tensor, Tensor]:
    """For ``nodes`` [V]: candidates in order of their distance in the k principal coordinates
    (a lower bound on the true distance), from a k-d tree (SciPy's, on the CPU: O(n log n) to
    build, O(log n) a neighbour), in rounds of ``TREE_NEIGHBOURS``. Every candidate within
    ``reach`` in those coordinates is measured exactly in float64. Returns (best [V]: nearest
    examined non-twin, a witness where <= radius; beyond [V]: the coordinate distance of the
    first candidate past ``reach``, a lower bound on every unexamined node, inf where not
    reached; unresolved [V] bool: no witness yet and every neighbour asked still within reach)."""
    from scipy.spatial import cKDTree

    n = h.shape[0]
    tree = cKDTree(coords.detach().cpu().numpy())
    best = torch.full((nodes.numel(),), float("inf"), dtype=h.dtype, device=h.device)
    beyond = torch.full_like(best, float("inf"))
    todo = torch.arange(nodes.numel(), device=h.device)
    for count in TREE_NEIGHBOURS:
        if todo.numel() == 0:
            break
        k = min(count, n)
        gap, other = tree.query(coords[nodes[todo]].detach().cpu().numpy(), k=k)
        gap = torch.as_tensor(gap, dtype=h.dtype, device=h.device).reshape(todo.numel(), k)
        other = torch.as_tensor(other, dtype=torch.long, device=h.device).reshape(todo.numel(), k)
        owner = nodes[todo]
        within = gap <= reach[owner, None]
        row, col = within.nonzero(as_tuple=True)
        exact = (h[other[row, col]] - h[owner[row]]).norm(dim=1)
        real = (other[row, col] != owner[row]) & (exact > twin_radius[owner[row]])
        best.scatter_reduce_(0, todo[row[real]], exact[real], reduce="amin")
        past = torch.where(within, torch.full_like(gap, float("inf")), gap).min(1).values
        beyond[todo] = past
        done = (best[todo] <= radius[owner]) | torch.isfinite(past) | (k == n)
        todo = todo[~done]
    unresolved = torch.zeros(nodes.numel(), dtype=torch.bool, device=h.device)
    unresolved[todo] = True
    return best, beyond, unresolved


#: Rank half-width beyond which a node's window is scanned densely (matrix products).
DENSE_WIDTH = 512


def _dense_scan(h: Tensor, nodes: Tensor, radius: Tensor, twin_radius: Tensor, chunk_entries: int) -> Tensor:
    """For ``nodes`` [V]: the exact distance of their nearest witness, else a lower bound on the
    nearest non-twin's distance (> radius), against all n nodes. Squared distances come from a
    float64 matrix product, with a rounding bound; every pair that the bound leaves undecided
    (near the twin or the witness radius) is re-checked exactly, as is each witness reported."""
    n, d = h.shape
    square = (h * h).sum(1)
    gamma = 4 * (d + 2) * torch.finfo(h.dtype).eps
    out = torch.empty(nodes.numel(), dtype=h.dtype, device=h.device)
    rows = max(1, chunk_entries * max(d, 1) // max(n, 1))
    for start in range(0, nodes.numel(), rows):
        v = nodes[start:start + rows]
        approx = (square[v, None] + square[None, :] - 2 * (h[v] @ h.T)).clamp_min(0)
        error = gamma * (square[v, None] + square[None, :])
        twin2, reach2 = twin_radius[v, None] ** 2, radius[v, None] ** 2
        unsure = ((approx - error <= twin2) & (approx + error > twin2)) | \
                 ((approx - error <= reach2) & (approx + error > reach2))
        row, col = unsure.nonzero(as_tuple=True)
        exact = (h[v[row]] - h[col]).pow(2).sum(1)
        low, high = approx - error, approx + error
        low[row, col], high[row, col] = exact, exact
        real = low > twin2
        real[torch.arange(v.numel(), device=h.device), v] = False  # the node itself
        candidate = torch.where(real & (high <= reach2), approx, torch.full_like(approx, float("inf")))
        nearest = candidate.argmin(1)
        witness = torch.isfinite(candidate.gather(1, nearest[:, None]).squeeze(1))
        bound = torch.where(real, low.clamp_min(0), torch.full_like(low, float("inf"))).min(1).values.sqrt()
        out[start:start + v.numel()] = torch.where(witness, (h[v] - h[nearest]).norm(dim=1), bound)
    return out
