"""PNG figures of metamer results: loss curves, neighbourhood drawings and feature matrices.

Figures are drawn on ``matplotlib.figure.Figure`` objects rendered by Agg, so no global pyplot
state or display is touched. Every function returns the path it wrote.
"""
from __future__ import annotations

from pathlib import Path

import networkx as nx
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from ..analysis.activation import cosine_per_row
from ..metamers.result import MetamerResult
from ..validation import is_binary
from .summary import num_targets

#: At most this many frozen boundary nodes are drawn in a neighbourhood picture.
MAX_BOUNDARY = 150
_EDGE_STYLES = {"kept": ("#9a9a9a", "solid"), "added": ("#e66101", "solid"),
                "removed": ("#5e9fd6", "dashed")}


def _save(fig: Figure, path) -> Path:
    """Write ``fig`` as PNG to ``path`` (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _histories(item, label: str) -> list[tuple[str, Tensor, list]]:
    """(panel title, history [steps, T], line labels) for a result, a tensor, or a list/dict."""
    if isinstance(item, dict):
        return [h for key, value in item.items() for h in _histories(value, str(key))]
    if isinstance(item, (list, tuple)):
        return [h for i, value in enumerate(item) for h in _histories(value, f"{label} {i}".strip())]
    if isinstance(item, MetamerResult):
        history, nodes = item.history, item.nodes
        title = label or f"{item.kind} metamers"
    elif isinstance(item, Tensor):
        history, nodes, title = item, None, label or "loss"
    else:
        raise TypeError(f"expected a MetamerResult, a history tensor, or a list/dict of them; "
                        f"got {type(item).__name__}")
    history = history.detach().double().reshape(history.shape[0], -1)
    names = [f"node {n}" for n in nodes] if nodes else [f"target {t}" for t in range(history.shape[1])]
    return [(title, history, names)]


def plot_loss_curves(results_or_histories, path) -> Path:
    """Activation loss L_act per step (log scale), one line per target and one panel per result.

    Args:
        results_or_histories: a :class:`MetamerResult`, a history tensor ([steps] or
            [steps, T]), or a list or dict (label -> item) of them.
        path: PNG file to write.
    """
    panels = _histories(results_or_histories, "")
    if not panels:
        raise ValueError("plot_loss_curves needs at least one result or history")
    fig = Figure(figsize=(4.6 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (title, history, names) in zip(axes, panels):
        steps = torch.arange(1, history.shape[0] + 1)
        for column, name in enumerate(names):
            ax.plot(steps, history[:, column].clamp_min(1e-12), label=name, linewidth=1.3)
        ax.set(yscale="log", xlabel="step", title=title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("activation loss $L_{act}$")
    return _save(fig, path)


def _check_target(result: MetamerResult, target: int) -> None:
    """ValueError unless ``target`` indexes one of the result's targets."""
    if result.nodes is None:
        raise ValueError("neighbourhood and feature pictures need a result for node targets, "
                         "not a whole-graph metamer")
    count = num_targets(result)
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < count:
        raise ValueError(f"target must be an int in [0, {count}) for this result, got {target!r}")


def _center(result: MetamerResult, target: int) -> int:
    """Local id of target ``target`` in the result's graphs."""
    center = result.center
    return int(center[target]) if isinstance(center, Tensor) else int(center)


def _free_nodes(data, target: int) -> Tensor:
    """Local ids of the optimised (free) nodes of target ``target``'s receptive field."""
    return ((data.batch == target) & data.free_mask).nonzero().flatten()


def _drawn_nodes(data, target: int) -> tuple[Tensor, Tensor, int]:
    """(free ids, drawn boundary ids, total boundary count) of one target's component."""
    boundary = ((data.batch == target) & ~data.free_mask).nonzero().flatten()
    return _free_nodes(data, target), boundary[:MAX_BOUNDARY], boundary.numel()


def _edge_set(data, keep: set[int]) -> set[tuple[int, int]]:
    """Undirected edges (without self loops, with non-zero weight) among the ``keep`` nodes."""
    edges = data.edge_index
    weight = getattr(data, "edge_weight", None)
    if weight is not None:
        edges = edges[:, weight > 0]
    return {(min(u, v), max(u, v)) for u, v in edges.t().tolist() if u != v and u in keep and v in keep}


def _node_colours(result: MetamerResult, free: Tensor) -> tuple[list, list]:
    """Reference colours (class, or grey without labels) and metamer colours (feature cosine)."""
    y = getattr(result.reference, "y", None)
    ref = ["#bbbbbb"] * free.numel() if y is None else [f"C{int(c) % 10}" for c in y[free]]
    similarity = cosine_per_row(result.graph.x[free], result.reference.x[free]).tolist()
    return ref, similarity


def _draw_panel(ax, graph: nx.Graph, pos: dict, free: list, colours, center: int, boundary: list,
                edge_groups: dict) -> object:
    """Draw one neighbourhood: boundary nodes, ``free`` nodes coloured by ``colours`` (colour
    names, or numbers in [0, 1] on viridis), the target, and edges grouped by style. Returns the
    free-node collection (for a colour bar)."""
    for name, edges in edge_groups.items():
        colour, style = _EDGE_STYLES[name]
        nx.draw_networkx_edges(graph, pos, edgelist=sorted(edges), ax=ax, edge_color=colour,
                               style=style, width=0.9 if name == "kept" else 1.4, alpha=0.7)
    nx.draw_networkx_nodes(graph, pos, nodelist=boundary, ax=ax, node_size=10, node_color="#d0d0d0",
                           node_shape="s")
    scale = {} if isinstance(colours[0], str) else dict(cmap="viridis", vmin=0.0, vmax=1.0)
    nodes = nx.draw_networkx_nodes(graph, pos, nodelist=free, ax=ax, node_size=45, node_color=colours,
                                   edgecolors="black", linewidths=0.4, **scale)
    nx.draw_networkx_nodes(graph, pos, nodelist=[center], ax=ax, node_size=320, node_shape="*",
                           node_color="red", edgecolors="black", linewidths=0.8)
    ax.set_axis_off()
    return nodes


def _legend_handles() -> list:
    """Legend entries for node roles and edge changes."""
    marker = dict(linestyle="none", markeredgecolor="black", markeredgewidth=0.5)
    nodes = [Line2D([], [], marker="*", markersize=13, color="red", label="target", **marker),
             Line2D([], [], marker="o", markersize=6, color="#7fbf7f", label="free (optimised)", **marker),
             Line2D([], [], marker="s", markersize=4, color="#d0d0d0", label="frozen boundary", **marker)]
    edges = [Line2D([], [], color=colour, linestyle=style, label=f"edge {name}")
             for name, (colour, style) in _EDGE_STYLES.items()]
    return nodes + edges


def _nx_graph(nodes: list, edges: set) -> nx.Graph:
    """An undirected networkx graph with ``nodes`` (in order) and ``edges``."""
    graph = nx.Graph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from(sorted(edges))
    return graph


def plot_neighbourhood(result: MetamerResult, path, target: int = 0) -> Path:
    """Reference vs metamer receptive field of one target, drawn side by side at the same layout.

    Free (optimised) nodes are circles, frozen boundary nodes grey squares (at most
    :data:`MAX_BOUNDARY`), the target a red star. Reference nodes are coloured by class; metamer
    nodes by the cosine similarity of their features to the reference (1 = unchanged). Metamer
    edges are grey when kept, orange when added; removed reference edges are dashed blue.

    Args:
        result: a node-target metamer result.
        path: PNG file to write.
        target: which target of a batched result (0-based position in ``result.nodes``).
    """
    _check_target(result, target)
    free, boundary, total_boundary = _drawn_nodes(result.reference, target)
    keep = sorted(set(free.tolist()) | set(boundary.tolist()))
    ref_edges, met_edges = _edge_set(result.reference, set(keep)), _edge_set(result.graph, set(keep))
    pos = nx.spring_layout(_nx_graph(keep, ref_edges), seed=0)
    graph, center = _nx_graph(keep, ref_edges | met_edges), _center(result, target)
    drawn = (free.tolist(), boundary.tolist())
    ref_colours, similarity = _node_colours(result, free)
    fig = Figure(figsize=(12, 5.8))
    left, right = fig.subplots(1, 2)
    _draw_panel(left, graph, pos, drawn[0], ref_colours, center, drawn[1], {"kept": ref_edges})
    changes = {"kept": met_edges & ref_edges, "added": met_edges - ref_edges,
               "removed": ref_edges - met_edges}
    nodes = _draw_panel(right, graph, pos, drawn[0], similarity, center, drawn[1], changes)
    fig.colorbar(nodes, ax=right, shrink=0.7, label="feature cosine to reference")
    left.set_title(f"reference: node {result.nodes[target]} (colour = class)")
    right.set_title(f"{result.kind} metamer: {len(changes['added'])} edges added, "
                    f"{len(changes['removed'])} removed")
    shown = (f" ({len(drawn[1])} of {total_boundary} boundary nodes shown)"
             if total_boundary > len(drawn[1]) else "")
    fig.suptitle(f"receptive field at layer {result.layer}: {free.numel()} free nodes{shown}")
    fig.legend(handles=_legend_handles(), loc="lower center", ncol=6, fontsize="small", frameon=False)
    return _save(fig, path)


def plot_features(result: MetamerResult, path, target: int = 0) -> Path:
    """Reference vs metamer feature matrices (free nodes x features) of one target's receptive
    field as images; the target is the top row. Binary (bag-of-words) features are drawn black
    and white, continuous ones on a shared diverging colour scale.

    Args:
        result: a node-target metamer result.
        path: PNG file to write.
        target: which target of a batched result (0-based position in ``result.nodes``).
    """
    _check_target(result, target)
    free = _free_nodes(result.reference, target)
    center = _center(result, target)
    rows = torch.cat([free.new_tensor([center]), free[free != center]])
    ref, met = result.reference.x[rows].double(), result.graph.x[rows].double()
    binary = is_binary(ref) and is_binary(met)
    scale = float(torch.cat([ref, met]).abs().max().clamp_min(1e-12))
    style = dict(cmap="Greys", vmin=0, vmax=1) if binary else dict(cmap="RdBu_r", vmin=-scale, vmax=scale)
    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, matrix, title in zip(axes, (ref, met), ("reference", f"{result.kind} metamer")):
        image = ax.imshow(matrix.numpy(), aspect="auto", interpolation="nearest", **style)
        ax.set(title=title, xlabel="feature")
    axes[0].set_ylabel("free node (row 0 = target)")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    if not binary:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="feature value")
    cosine = float(cosine_per_row(met, ref).mean())
    node = result.nodes[target]
    fig.suptitle(f"features of node {node}'s receptive field ({rows.numel()} free nodes, "
                 f"{'binary' if binary else 'continuous'}; mean row cosine {cosine:.3f})")
    return _save(fig, path)


def result_figures(folder, label: str, result: MetamerResult, max_targets: int = 4) -> dict[str, Path]:
    """Neighbourhood pictures (and feature pictures unless ``kind == "structure"``) of the
    first ``max_targets`` targets of ``result``, written into ``folder``; caption -> path."""
    figures = {}
    for target in range(min(num_targets(result), max_targets)):
        node = result.nodes[target]
        figures[f"{label}: neighbourhood of node {node}"] = plot_neighbourhood(
            result, Path(folder) / f"{label}_neighbourhood_node{node}.png", target)
        if result.kind != "structure":
            figures[f"{label}: feature matrix of node {node}"] = plot_features(
                result, Path(folder) / f"{label}_featurematrix_node{node}.png", target)
    return figures
