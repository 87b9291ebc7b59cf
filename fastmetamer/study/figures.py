"""Study figures (PNG, drawn on Agg ``Figure`` objects; no pyplot state): per-layer consistency,
metamer-dimension histograms, the cross-architecture heat map and loss curves. Original vs
metamer neighbourhoods are drawn by :func:`fastmetamer.report.plot_neighbourhood`."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _panels(keys: list, width: float = 4.8, height: float = 3.6):
    """A figure with one panel per key (at most 3 per row) and the axes in key order."""
    cols = min(3, max(1, len(keys)))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    return fig, axes


def layer_consistency(rows: list[dict], path: Path) -> Path:
    """Mean consistency C per matched layer (95% CI bars), one line per architecture and one
    panel per dataset. ``rows``: summary rows of one mitigation and model shape."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = _panels(datasets)
    for ax, dataset in zip(axes, datasets):
        for arch in dict.fromkeys(r["arch"] for r in rows if r["dataset"] == dataset):
            mine = [r for r in rows if r["dataset"] == dataset and r["arch"] == arch]
            y = torch.tensor([r["consistency"] for r in mine])
            err = torch.tensor([[r["consistency"] - r["consistency_lo"] for r in mine],
                                [r["consistency_hi"] - r["consistency"] for r in mine]])
            ax.errorbar(range(len(mine)), y, yerr=err, marker="o", capsize=3, label=arch)
            ax.set_xticks(range(len(mine)), [r["layer"] for r in mine])
        ax.set(title=dataset, xlabel="matched layer (input side → output)", ylabel="consistency C",
               ylim=(-0.02, 1.02))
        ax.legend(fontsize="small")
    return _save(fig, path)


def dimension_histograms(target_rows: list[dict], path: Path) -> Path:
    """Histograms of log10 metamer dimension and of log-volume per architecture, one row of two
    panels per dataset. ``target_rows``: per-target rows (one layer per model)."""
    datasets = list(dict.fromkeys(r["dataset"] for r in target_rows))
    fig = Figure(figsize=(10, 3.4 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    for (left, right), dataset in zip(axes, datasets):
        mine = [r for r in target_rows if r["dataset"] == dataset]
        _histograms(left, mine, lambda r: math.log10(max(r["dimension"], 1)))
        _histograms(right, mine, lambda r: r["log_volume"])
        left.set(title=f"{dataset}: metamer dimension", xlabel="log10 D_v", ylabel="targets")
        right.set(title=f"{dataset}: volume change", xlabel="log vol_v = Σ log σ_i")
        left.legend(fontsize="small")
    return _save(fig, path)


def _histograms(ax, rows: list[dict], value) -> None:
    """Overlaid histograms of ``value(row)`` per architecture, on shared bins."""
    values = {arch: torch.tensor([value(r) for r in rows if r["arch"] == arch], dtype=torch.float64)
              for arch in dict.fromkeys(r["arch"] for r in rows)}
    finite = torch.cat(list(values.values()))
    finite = finite[torch.isfinite(finite)]
    if not finite.numel():
        return
    low, high = float(finite.min()), float(finite.max())
    bins = torch.linspace(low - 0.5, high + 0.5, 21) if high - low < 1e-9 else torch.linspace(low, high, 21)
    for arch, v in values.items():
        ax.hist(v[torch.isfinite(v)].numpy(), bins=bins.numpy(), alpha=0.5, label=arch)


def cross_architecture(rows: list[dict], path: Path) -> Path:
    """Heat map per dataset: judge B's accuracy on source A's metamers (rows A, columns B), each
    cell annotated with the accuracy, its CI, and B's accuracy on the references."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = _panels(datasets, width=5.2, height=4.6)
    for ax, dataset in zip(axes, datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        sources = list(dict.fromkeys(r["source"] for r in mine))
        judges = list(dict.fromkeys(r["judge"] for r in mine))
        matrix = torch.full((len(sources), len(judges)), math.nan)
        for r in mine:
            i, j = sources.index(r["source"]), judges.index(r["judge"])
            matrix[i, j] = r["metamer_acc"]
            ax.text(j, i, f"{r['metamer_acc']:.2f}\n[{r['metamer_ci_low']:.2f},{r['metamer_ci_high']:.2f}]"
                    f"\nref {r['reference_acc']:.2f}", ha="center", va="center", fontsize=7)
        image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set(title=f"{dataset}: judge accuracy on metamers", xlabel="judge B", ylabel="source A",
               xticks=range(len(judges)), yticks=range(len(sources)))
        ax.set_xticklabels(judges, rotation=30)
        ax.set_yticklabels(sources)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def loss_curves(records: list[dict], path: Path) -> Path:
    """Median activation loss L_act per step with the inter-quartile band over targets, one line
    per architecture and one panel per dataset. ``records``: cell records (one per line)."""
    datasets = list(dict.fromkeys(r["cell"]["dataset"] for r in records))
    fig, axes = _panels(datasets)
    for ax, dataset in zip(axes, datasets):
        for record in (r for r in records if r["cell"]["dataset"] == dataset):
            steps = torch.tensor(record["history"]["steps"]) + 1
            loss = torch.tensor(record["history"]["loss"], dtype=torch.float64).clamp_min(1e-12)
            low, mid, high = torch.quantile(loss, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=1)
            line, = ax.plot(steps, mid, label=record["cell"]["arch"])
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set(title=dataset, xlabel="step", ylabel="L_act (median, IQR)", yscale="log")
        ax.legend(fontsize="small")
    return _save(fig, path)
