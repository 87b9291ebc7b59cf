"""Aggregates behind the written analysis in ``docs/results/README.md``.

Reads ``study.csv`` and ``cross_architecture.csv`` that ``fastmetamer study`` wrote into ``study/``,
and the cell records of ``study/`` and ``structure_steps/``, and
writes ``aggregates.md`` beside this file: per dataset, the means over the message-passing
architectures of every mitigation at the first and the output layer, the first-versus-output
layer comparison, the rank correlations between metamer dimension / volume and the pass rate and
consistency, the cross-architecture accuracy drops, per-seed means of the cells run with two
seeds, and structure metamers at 400 against 1600 steps. Every number the analysis quotes that is
not a single cell of ``study/study.md`` comes from here.

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

from scipy.stats import spearmanr

from fastmetamer.study.config import ModelSpec
from fastmetamer.study.tables import target_rows

HERE = Path(__file__).resolve().parent
ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE  # holds study/ and structure_steps/
#: Architectures averaged in the mitigation tables: the message-passing GNNs with hidden layers
#: (SGC has no nonlinearity and one layer, APPNP's first layers are per-node, MLP is the control).
GNNS = ("gcn", "graphsage", "gin", "gat")
MITIGATION_METRICS = ("passed", "relevant", "consistency", "feature_cosine", "relative_l2", "marginal_w1", "loss",
                      "dimension_ratio", "rank_deficit", "log_volume")


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
                rows.append([mitigation, len(cells)] + [mean(cells, m) for m in MITIGATION_METRICS])
        out.append(f"**{dataset}, {position} layer: means over {', '.join(GNNS)}**\n\n"
                   + table(["mitigation", "cells", *MITIGATION_METRICS], rows))
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
                rows.append([name, f"{x} vs {y}", len(keep), float(rho)])
    return f"**{dataset}: Spearman correlations over base-grid cells**\n\n" + table(
        ["cells", "pair", "n", "rho"], rows)


def layer_section(dataset: str, base: list[dict]) -> str:
    """First versus output layer, no mitigation, means over :data:`GNNS`."""
    none = [r for r in base if r["mitigation"] == "none" and r["arch"] in GNNS]
    rows = [[position, *(mean([r for r in none if _at(r, position)], m)
                         for m in ("loss", "passed", "relevant", "consistency"))]
            for position in ("first", "output")]
    return f"**{dataset}: first versus output layer (no mitigation)**\n\n" + table(
        ["layer", "loss", "passed", "relevant", "consistency"], rows)


def cross_section(cross: list[dict]) -> str:
    """Per dataset and source: mean judge accuracy drop (reference − metamer) over the other
    architectures' judges."""
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in cross):
        mine = [r for r in cross if r["dataset"] == dataset]
        for source in dict.fromkeys(r["source"] for r in mine):
            others = [r for r in mine if r["source"] == source and r["judge"] != source]
            if others:
                drop = statistics.fmean(r["reference_acc"] - r["metamer_acc"] for r in others)
                rows.append([dataset, source, len(others), drop])
    return "**Cross-architecture: mean accuracy drop of the other judges on a source's metamers**\n\n" + table(
        ["dataset", "source", "judges", "reference − metamer accuracy"], rows)


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
            means = {m: [mean(seeds[s], m) for s in sorted(seeds)] for m in ("passed", "consistency", "relevant")}
            rows.append([key[0], key[1], key[2], key[5], *(" / ".join(f"{v:.3g}" for v in means[m]) for m in means)])
    return "**Cells with two training seeds: per-seed means (seed 0 / seed 1)**\n\n" + table(
        ["dataset", "arch", "mitigation", "layer", "passed", "consistency", "relevant"], rows)


def structure_steps_section() -> str:
    """Structure cells at the study's steps against the same targets at more steps
    (``docs/results/structure_steps``): does a failed target pass when optimised longer?"""
    longer = {(r["dataset"], r["arch"], int(r["target"])): r for r in read_targets("structure_steps")}
    base = [r for r in read_targets() if r["kind"] == "structure" and int(r["seed"]) == 0
            and (r["dataset"], r["arch"], int(r["target"])) in longer]
    rows = []
    for arch in dict.fromkeys(r["arch"] for r in base):
        mine = [r for r in base if r["arch"] == arch]
        after = [longer[(r["dataset"], arch, int(r["target"]))] for r in mine]
        rescued = sum(1 for a, b in zip(mine, after) if a["passed"] < 0.5 <= b["passed"])
        failed = sum(1 for a in mine if a["passed"] < 0.5)
        either = statistics.fmean(max(a["passed"], b["passed"]) for a, b in zip(mine, after))
        rows.append([mine[0]["dataset"], arch, len(mine), mean(mine, "passed"), mean(after, "passed"), either,
                     f"{rescued} of {failed}", statistics.median(r["loss"] for r in mine),
                     statistics.median(r["loss"] for r in after), mean(after, "edge_jaccard")])
    return "**Structure metamers: 400 against 1600 steps, same targets**\n\n" + table(
        ["dataset", "arch", "targets", "passed (400)", "passed (1600)", "passed (either)", "failed at 400, pass at 1600",
         "median loss (400)", "median loss (1600)", "edge_jaccard (1600)"], rows)


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
