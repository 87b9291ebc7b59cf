"""Study tables: per-cell summaries with bootstrap CIs over targets (pooled over seeds), the
per-target table, the cross-architecture matrix, as CSV and Markdown.

Trivial targets (SPEC §2.3: the metamer came back identical to its reference over R) are counted
apart: a cell's ``trivial`` column is their number, the pass rate and the other metamer metrics
are taken over the non-trivial targets only, and consistency C over the passed, non-trivial
ones (C is NaN for every other target; means are NaN-aware). Cell files written before the
library reported ``trivial`` get it derived from their records (:func:`per_target`)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from ..analysis import bootstrap_ci, recognisability_matrix
from ..report import markdown_table
from .cells import RECORDS
from .crossarch import pooled, pooled_control

#: Summary metrics (per-target records averaged, with 95% bootstrap CIs).
SUMMARY_METRICS = ("passed", "loss", "act_cosine", "snr_db", "feature_cosine", "relative_l2", "marginal_w1",
                   "edge_jaccard", "wl_similarity", "consistency", "relevant", "dimension", "dimension_ratio",
                   "rank_deficit", "log_volume")
#: Metrics of the metamer itself: averaged over the non-trivial targets only (a trivial target
#: has no metamer). The others (metamer dimension and volume) describe the target and are
#: averaged over all targets.
METAMER_METRICS = ("passed", "loss", "act_cosine", "snr_db", "feature_cosine", "relative_l2", "marginal_w1",
                   "edge_jaccard", "wl_similarity", "consistency", "relevant")
#: Tolerance of the derivation of ``trivial`` for old cell files (identical over R).
_SAME = 1e-9
GROUP = ("dataset", "task", "arch", "mitigation", "depth", "width", "layer", "kind")
N_BOOT = 1000


def summary_rows(records: list[dict]) -> list[dict]:
    """One row per cell pooled over seeds: the cell fields, ``seeds``, ``targets``, ``trivial``
    (count), ``trivial_derived`` (derived from old records), mean model test ``accuracy`` and,
    for adversarially trained models whose records have it, PGD ``robust_accuracy`` (else NaN), and for each metric m of :data:`SUMMARY_METRICS`: ``m``, ``m_lo``, ``m_hi``."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        if record["status"] == "ok":
            groups.setdefault(tuple(cell_field(record, k) for k in GROUP), []).append(record)
    return [_summary(dict(zip(GROUP, key)), members) for key, members in groups.items()]


def cell_field(record: dict, key: str):
    """A cell field of a record (``kind`` defaults to "features" for records without it)."""
    return record["cell"].get(key, "features") if key == "kind" else record["cell"][key]


def per_target(record: dict) -> dict[str, list[float]]:
    """The per-target records of a cell with the honest-pass rules applied, also to cell files
    written before ``trivial`` existed: ``trivial`` (1.0 / 0.0) is taken from the record, or, when
    the record lacks it, derived as "identical to the reference over R" -- a feature metamer with
    relative L2 distance 0 (mean feature cosine 1 where the distance is absent), a structure metamer
    with edge Jaccard 1 (a joint metamer needs both); ``trivial_derived`` (one flag per target)
    says which. ``passed`` is 0 for a trivial target, and ``consistency`` is NaN unless the target
    passed and is not trivial."""
    records = {key: list(values) for key, values in record["per_target"].items()}
    count = len(record["targets"])
    derived = "trivial" not in records
    if derived:
        records["trivial"] = [float(_derived_trivial(records, cell_field(record, "kind"), t)) for t in range(count)]
    trivial = [bool(v) for v in records["trivial"]]
    records["trivial_derived"] = [float(derived)] * count
    if "passed" in records:
        records["passed"] = [0.0 if trivial[t] else float(v) for t, v in enumerate(records["passed"])]
        if "consistency" in records:
            records["consistency"] = [v if records["passed"][t] >= 0.5 else math.nan
                                      for t, v in enumerate(records["consistency"])]
    return records


def _derived_trivial(records: dict, kind: str, t: int) -> bool:
    def close(key: str, value: float) -> bool | None:
        values = records.get(key)
        if values is None or values[t] is None or values[t] != values[t]:
            return None
        return abs(values[t] - value) <= _SAME

    same_features = close("relative_l2", 0.0)
    if same_features is None:
        same_features = close("feature_cosine", 1.0)
    same_edges = close("edge_jaccard", 1.0)
    if kind == "features":
        return bool(same_features)
    if kind == "structure":
        return bool(same_edges)
    return bool(same_features) and bool(same_edges)


def _summary(fields: dict, members: list[dict]) -> dict:
    records = [per_target(m) for m in members]
    trivial = [bool(v) for r in records for v in r["trivial"]]
    row = {**fields, "seeds": len(members),
           "targets": sum(len(m["targets"]) for m in members),
           "trivial": sum(trivial),
           "trivial_derived": any(r["trivial_derived"][:1] == [1.0] for r in records),
           "accuracy": sum(m["model"]["test_acc"] for m in members) / len(members)}
    robust = [m["model"]["robust_test_acc"] for m in members if "robust_test_acc" in m["model"]]
    row["robust_accuracy"] = sum(robust) / len(robust) if robust else math.nan
    for metric in SUMMARY_METRICS:
        values = torch.tensor([v for r in records for v in r.get(metric, [])], dtype=torch.float64)
        if metric in METAMER_METRICS and values.numel() == len(trivial):
            values = values[~torch.tensor(trivial, dtype=torch.bool)]
        values = values[torch.isfinite(values)]
        mean, low, high = bootstrap_ci(values, N_BOOT) if values.numel() else (math.nan,) * 3
        row.update({metric: mean, f"{metric}_lo": low, f"{metric}_hi": high})
    return row


def target_rows(records: list[dict]) -> list[dict]:
    """The tidy per-target table: cell fields, seed, target, and every record of :data:`RECORDS`
    (with the rules of :func:`per_target`: ``trivial`` derived for old files, ``passed`` 0 for a
    trivial target, ``consistency`` NaN unless passed and non-trivial), plus ``trivial_derived``."""
    rows = []
    for record in records:
        if record["status"] != "ok":
            continue
        records = per_target(record)
        for t, target in enumerate(record["targets"]):
            rows.append({**record["cell"], "kind": cell_field(record, "kind"), "target": target,
                         **{key: records[key][t] for key in (*RECORDS, "trivial_derived") if key in records}})
    return rows


def cross_rows(predictions: list[dict]) -> list[dict]:
    """Recognisability rows (judge accuracy on metamers vs references, bootstrap CIs over the
    targets of all seeds) per dataset, with the shuffled-features control (``shuffled_acc``:
    the judge's accuracy on the reference targets with their features shuffled across nodes;
    NaN for predictions cached before the control existed)."""
    rows = []
    for dataset in dict.fromkeys(p["dataset"] for p in predictions):
        matrix = recognisability_matrix(pooled(predictions, dataset), n_boot=N_BOOT)
        control = pooled_control(predictions, dataset)
        for row in matrix:
            shuffled = control.get((row["source"], row["judge"]))
            if shuffled is not None and shuffled[1].numel():
                acc, low, high = bootstrap_ci((shuffled[0] == shuffled[1]).double(), N_BOOT)
            else:
                acc = low = high = math.nan
            rows.append({"dataset": dataset, **row, "shuffled_acc": acc, "shuffled_ci_low": low,
                         "shuffled_ci_high": high})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` (dicts; columns = union of keys, in first-seen order) as CSV."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def with_ci(rows: list[dict], metrics) -> list[dict]:
    """Rows with each metric formatted as ``mean [lo, hi]`` for Markdown."""
    def cell(row, m):
        if m not in row or row[m] != row[m]:
            return ""
        return f"{row[m]:.3g} [{row[f'{m}_lo']:.3g}, {row[f'{m}_hi']:.3g}]"

    return [{**row, **{m: cell(row, m) for m in metrics}} for row in rows]


def markdown(rows: list[dict], columns, metrics=()) -> str:
    """A Markdown table of ``rows`` with the ``metrics`` columns shown with their CIs."""
    return markdown_table(with_ci(rows, metrics), list(columns) + list(metrics))
