"""Aggregates behind the written analysis in ``docs/results/README.md``.

Reads ``study.csv`` and ``cross_architecture.csv`` that ``fastmetamer study`` wrote into ``study/``,
and the cell records of ``study/`` and ``structure_steps/``, and
writes ``aggregates.md`` beside this file: per dataset, the means over the message-passing
architectures of every mitigation at the first and the output layer, the first-versus-output
layer comparison, the rank correlations between metamer dimension / volume and the pass rate and
consistency, the cross-architecture accuracy drops, per-seed means of the cells run with two
seeds, and structure metamers at 400 against 1600 steps. Every number the analysis quotes that is
not a single cell of ``study/study.md`` comes from here.

Trivial targets (metamer identical to its reference over R) are counted apart, as in the study's
tables: pass rates and the other metamer metrics are over non-trivial targets, consistency over
passed, non-trivial ones. Brackets are 95% percentile-bootstrap CIs (``N_BOOT`` resamples, fixed
seed): for a mean over cells, each cell's targets are resampled (pooled over seeds) and the cell
means averaged again; for a correlation, the cells are resampled; for a cross-architecture drop,
the source's targets are resampled (paired across judges).

Usage: ``.venv/bin/python docs/results/aggregate.py [ROOT]`` (reads only the study folders' files;
ROOT defaults to ``docs/results``).
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from fastmetamer.study.config import ModelSpec
from fastmetamer.study.crossarch import pooled
from fastmetamer.study.tables import METAMER_METRICS, target_rows

HERE = Path(__file__).resolve().parent
ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE  # holds study/ and structure_steps/
#: Architectures averaged in the mitigation tables: the message-passing GNNs with hidden layers
#: (SGC has no nonlinearity and one layer, APPNP's first layers are per-node, MLP is the control).
GNNS = ("gcn", "graphsage", "gin", "gat")
MITIGATION_METRICS = ("passed", "relevant", "consistency", "feature_cosine", "relative_l2", "marginal_w1", "loss",
                      "dimension_ratio", "rank_deficit", "log_volume")
#: Metrics shown with bootstrap CIs in the mean-over-cells tables.
CI_METRICS = ("passed", "relevant", "consistency")
N_BOOT = 1000
CELL = ("dataset", "arch", "mitigation", "depth", "width", "layer", "kind")
_TARGETS: dict[str, dict[tuple, list[dict]]] = {}


def read(name: str, folder: str = "study") -> list[dict]:
    """Rows of a CSV of a study folder under ``docs/results`` with numbers parsed ([] if absent)."""
    path = ROOT / folder / name
    if not path.is_file():
        return []
    with open(path) as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def is_output(row: dict) -> bool:
    """True at the output layer of the row's model (its last matched layer, or the readout)."""
    spec = ModelSpec(row["dataset"], row["arch"], row["mitigation"], int(row["depth"]), int(row["width"]), 0)
    return row["layer"] == spec.output_layer()


def read_targets(folder: str = "study") -> list[dict]:
    """Per-target rows of a study folder, built from its cell records (the rows of the report's
    ``targets.csv``, which is generated, not committed)."""
    cells = sorted((ROOT / folder / "cells").glob("*.json"))
    return target_rows([json.loads(p.read_text()) for p in cells if not p.name.startswith("cross-")])


def cell_targets(folder: str = "study") -> dict[tuple, list[dict]]:
    """Per-target rows of a study folder grouped by cell (:data:`CELL`, seeds pooled); cached."""
    if folder not in _TARGETS:
        groups: dict[tuple, list[dict]] = {}
        for row in read_targets(folder):
            groups.setdefault(tuple(row[k] for k in CELL), []).append(row)
        _TARGETS[folder] = groups
    return _TARGETS[folder]


def _valid(row: dict, metric: str) -> bool:
    value = row.get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return not (metric in METAMER_METRICS and row.get("trivial"))


def cell_values(row: dict, metric: str, folder: str = "study") -> np.ndarray:
    """The per-target values of ``metric`` in the cell of summary row ``row`` (non-trivial
    targets for metamer metrics; C only where defined)."""
    key = tuple(int(row[k]) if k in ("depth", "width") else row[k] for k in CELL)
    return np.array([r[metric] for r in cell_targets(folder).get(key, []) if _valid(r, metric)], dtype=float)


def mean_ci(cells: list[dict], metric: str, folder: str = "study") -> tuple[float, float, float]:
    """Mean over ``cells`` (summary rows) of their per-cell means, with a bootstrap CI that
    resamples each cell's targets."""
    rng = np.random.default_rng(0)
    draws, point = [], []
    for row in cells:
        values = cell_values(row, metric, folder)
        if values.size:
            point.append(values.mean())
            draws.append(values[rng.integers(0, values.size, (N_BOOT, values.size))].mean(1))
    if not draws:
        return (math.nan,) * 3
    means = np.mean(draws, axis=0)
    return float(np.mean(point)), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def ci_text(value: tuple[float, float, float]) -> str:
    mean_, low, high = value
    return "" if mean_ != mean_ else f"{mean_:.3g} [{low:.3g}, {high:.3g}]"


def mean(rows: list[dict], metric: str) -> float:
    values = [r[metric] for r in rows if isinstance(r[metric], float) and math.isfinite(r[metric])]
    return statistics.fmean(values) if values else math.nan


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats with 3 significant digits."""
    fmt = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in fmt]) + "\n"


def mitigation_section(dataset: str, base: list[dict]) -> str:
    """Means over :data:`GNNS` of every mitigation, at the first and the output layer."""
    out = []
    positions = ("readout",) if base[0]["task"] == "graph" else ("first", "output")
    for position in positions:
        rows = []
        for mitigation in dict.fromkeys(r["mitigation"] for r in base):
            cells = [r for r in base if r["mitigation"] == mitigation and r["arch"] in GNNS
                     and _at(r, position)]
            if cells:
                rows.append([mitigation, len(cells), int(sum(r["trivial"] for r in cells))]
                            + [ci_text(mean_ci(cells, m)) if m in CI_METRICS else mean(cells, m)
                               for m in MITIGATION_METRICS])
        out.append(f"**{dataset}, {position} layer: means over {', '.join(GNNS)}**\n\n"
                   + table(["mitigation", "cells", "trivial", *MITIGATION_METRICS], rows))
    return "\n".join(out)


def _at(row: dict, position: str) -> bool:
    if position == "first":
        return row["layer"] == "layers.0"
    return is_output(row)


def correlation_section(dataset: str, base: list[dict]) -> str:
    """Spearman correlations over the base-grid cells (all architectures and mitigations)."""
    pairs = [("dimension_ratio", "passed"), ("dimension_ratio", "consistency"), ("log_volume", "consistency"),
             ("rank_deficit", "consistency")]
    groups = {"output layer": [r for r in base if is_output(r)],
              "first layer": [r for r in base if r["layer"] == "layers.0"]}
    rows = []
    for name, cells in groups.items():
        for x, y in pairs:
            xs, ys = [r[x] for r in cells], [r[y] for r in cells]
            keep = [i for i in range(len(cells)) if all(isinstance(v, float) and math.isfinite(v)
                                                        for v in (xs[i], ys[i]))]
            xs, ys = [xs[i] for i in keep], [ys[i] for i in keep]
            if len(keep) > 3 and len(set(xs)) > 1 and len(set(ys)) > 1:  # else rho is undefined
                rho = spearmanr(xs, ys).statistic
                rows.append([name, f"{x} vs {y}", len(keep), float(rho), _rho_ci(xs, ys)])
    return f"**{dataset}: Spearman correlations over base-grid cells**\n\n" + table(
        ["cells", "pair", "n", "rho", "95% CI (cells resampled)"], rows)


def _rho_ci(xs: list[float], ys: list[float]) -> str:
    """Percentile-bootstrap CI of Spearman's rho, resampling the cells (undefined resamples,
    with a constant column, are dropped)."""
    rng = np.random.default_rng(0)
    x, y = np.asarray(xs), np.asarray(ys)
    rhos = []
    for _ in range(N_BOOT):
        idx = rng.integers(0, x.size, x.size)
        if np.ptp(x[idx]) > 0 and np.ptp(y[idx]) > 0:
            rhos.append(spearmanr(x[idx], y[idx]).statistic)
    return f"[{np.quantile(rhos, 0.025):.2f}, {np.quantile(rhos, 0.975):.2f}]" if rhos else ""


def layer_section(dataset: str, base: list[dict]) -> str:
    """First versus output layer, no mitigation, means over :data:`GNNS`."""
    none = [r for r in base if r["mitigation"] == "none" and r["arch"] in GNNS]
    rows = [[position, *(ci_text(mean_ci([r for r in none if _at(r, position)], m))
                         for m in ("loss", "passed", "relevant", "consistency"))]
            for position in ("first", "output")]
    return f"**{dataset}: first versus output layer (no mitigation)**\n\n" + table(
        ["layer", "loss", "passed", "relevant", "consistency"], rows)


def cross_section(cross: list[dict]) -> str:
    """Per dataset and source: mean judge accuracy drop (reference − metamer) over the other
    architectures' judges, with a bootstrap CI over the source's targets (paired across judges)."""
    predictions = [row for p in sorted((ROOT / "study" / "cells").glob("cross-*.json"))
                   for row in json.loads(p.read_text())]
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in cross):
        mine = [r for r in cross if r["dataset"] == dataset]
        pairs = pooled(predictions, dataset)
        for source in dict.fromkeys(r["source"] for r in mine):
            others = [r for r in mine if r["source"] == source and r["judge"] != source]
            if others:
                drop = statistics.fmean(r["reference_acc"] - r["metamer_acc"] for r in others)
                rows.append([dataset, source, len(others), drop, _drop_ci(pairs, source, others)])
    return "**Cross-architecture: mean accuracy drop of the other judges on a source's metamers**\n\n" + table(
        ["dataset", "source", "judges", "reference − metamer accuracy", "95% CI (targets resampled)"], rows)


def _drop_ci(pairs: dict, source: str, others: list[dict]) -> str:
    found = [pairs[(source, r["judge"])] for r in others if (source, r["judge"]) in pairs]
    if not found:
        return ""
    diffs = np.stack([(ref == lab).double().numpy() - (met == lab).double().numpy() for met, ref, lab in found])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, diffs.shape[1], (N_BOOT, diffs.shape[1]))
    draws = diffs[:, idx].mean(axis=(0, 2))
    return f"[{np.quantile(draws, 0.025):.2f}, {np.quantile(draws, 0.975):.2f}]"


def seed_section(targets: list[dict]) -> str:
    """Cells run with more than one training seed: per-seed means over targets."""
    cells: dict[tuple, dict[int, list[dict]]] = {}
    for row in targets:
        if row["kind"] == "features":
            key = tuple(row[k] for k in ("dataset", "arch", "mitigation", "depth", "width", "layer"))
            cells.setdefault(key, {}).setdefault(int(row["seed"]), []).append(row)
    rows = []
    for key, seeds in cells.items():
        if len(seeds) > 1:
            means = {m: [mean([r for r in seeds[s] if _valid(r, m)], m) for s in sorted(seeds)]
                     for m in ("passed", "consistency", "relevant")}
            trivial = " / ".join(str(int(sum(r["trivial"] for r in seeds[s]))) for s in sorted(seeds))
            rows.append([key[0], key[1], key[2], key[5], trivial,
                         *(" / ".join(f"{v:.3g}" for v in means[m]) for m in means)])
    return ("**Cells with two training seeds: per-seed means (seed 0 / seed 1); pass rate and relevant share "
            "over non-trivial targets, consistency over passed non-trivial ones**\n\n" + table(
                ["dataset", "arch", "mitigation", "layer", "trivial", "passed", "consistency", "relevant"], rows))


def structure_steps_section() -> str:
    """Structure cells at the study's steps against the same targets at more steps
    (``docs/results/structure_steps``): does a failed target pass when optimised longer?"""
    longer = {(r["dataset"], r["arch"], int(r["target"])): r for r in read_targets("structure_steps")}
    base = [r for r in read_targets() if r["kind"] == "structure" and int(r["seed"]) == 0
            and (r["dataset"], r["arch"], int(r["target"])) in longer]
    rows = []
    for arch in dict.fromkeys(r["arch"] for r in base):
        everyone = [r for r in base if r["arch"] == arch]
        # non-trivial in both runs (a target with no free edge slot is trivial in both)
        mine = [r for r in everyone if not r["trivial"] and not longer[(r["dataset"], arch, int(r["target"]))]["trivial"]]
        after = [longer[(r["dataset"], arch, int(r["target"]))] for r in mine]
        rescued = sum(1 for a, b in zip(mine, after) if a["passed"] < 0.5 <= b["passed"])
        failed = sum(1 for a in mine if a["passed"] < 0.5)
        either = statistics.fmean(max(a["passed"], b["passed"]) for a, b in zip(mine, after)) if mine else math.nan
        rows.append([everyone[0]["dataset"], arch, len(everyone), len(everyone) - len(mine), mean(mine, "passed"),
                     mean(after, "passed"), either, f"{rescued} of {failed}",
                     statistics.median(r["loss"] for r in mine) if mine else math.nan,
                     statistics.median(r["loss"] for r in after) if after else math.nan, mean(after, "edge_jaccard")])
    return ("**Structure metamers: 400 against 1600 steps, same targets (pass rates over the targets that are "
            "non-trivial in both runs)**\n\n" + table(
                ["dataset", "arch", "targets", "trivial (either run)", "passed (400)", "passed (1600)", "passed (either)",
                 "failed at 400, pass at 1600", "median loss (400)", "median loss (1600)", "edge_jaccard (1600)"], rows))


def main() -> Path:
    rows = [r for r in read("study.csv") if r["kind"] == "features"]
    parts = ["# Aggregates of the invariance study\n", "Written by `docs/results/aggregate.py` from "
             "`study/study.csv` and `study/cross_architecture.csv`.\n"]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        base = [r for r in rows if r["dataset"] == dataset and r["depth"] == 2 and r["width"] == 64]
        parts.append(f"## {dataset}\n")
        parts.append(mitigation_section(dataset, base))
        if base[0]["task"] == "node":
            parts.append(layer_section(dataset, base))
        parts.append(correlation_section(dataset, base))
    parts.append("## Cross-architecture recognisability\n")
    parts.append(cross_section(read("cross_architecture.csv")))
    parts.append("## Training seeds\n")
    parts.append(seed_section(read_targets()))
    if read_targets("structure_steps"):
        parts.append("## Structure metamers with more steps\n")
        parts.append(structure_steps_section())
    path = ROOT / "aggregates.md"
    path.write_text("\n".join(parts))
    return path


if __name__ == "__main__":
    print(main())
