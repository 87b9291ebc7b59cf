"""Study tables: per-cell summaries with bootstrap CIs over targets (pooled over seeds), the
per-target table, the cross-architecture matrix, as CSV and Markdown."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from ..analysis import bootstrap_ci, recognisability_matrix
from ..report import markdown_table
from .cells import RECORDS
from .crossarch import pooled

#: Summary metrics (per-target records averaged, with 95% bootstrap CIs).
SUMMARY_METRICS = ("passed", "loss", "act_cosine", "snr_db", "feature_cosine", "relative_l2", "marginal_w1",
                   "edge_jaccard", "wl_similarity", "consistency", "relevant", "dimension", "dimension_ratio",
                   "rank_deficit", "log_volume")
GROUP = ("dataset", "task", "arch", "mitigation", "depth", "width", "layer", "kind")
N_BOOT = 1000


def summary_rows(records: list[dict]) -> list[dict]:
    """One row per cell pooled over seeds: the cell fields, ``seeds``, ``targets``, mean model
    test ``accuracy``, and for each metric m of :data:`SUMMARY_METRICS`: ``m``, ``m_lo``, ``m_hi``."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        if record["status"] == "ok":
            groups.setdefault(tuple(cell_field(record, k) for k in GROUP), []).append(record)
    return [_summary(dict(zip(GROUP, key)), members) for key, members in groups.items()]


def cell_field(record: dict, key: str):
    """A cell field of a record (``kind`` defaults to "features" for records without it)."""
    return record["cell"].get(key, "features") if key == "kind" else record["cell"][key]


def _summary(fields: dict, members: list[dict]) -> dict:
    row = {**fields, "seeds": len(members),
           "targets": sum(len(m["targets"]) for m in members),
           "accuracy": sum(m["model"]["test_acc"] for m in members) / len(members)}
    for metric in SUMMARY_METRICS:
        values = torch.tensor([v for m in members for v in m["per_target"].get(metric, [])], dtype=torch.float64)
        values = values[torch.isfinite(values)]
        mean, low, high = bootstrap_ci(values, N_BOOT) if values.numel() else (math.nan,) * 3
        row.update({metric: mean, f"{metric}_lo": low, f"{metric}_hi": high})
    return row


def target_rows(records: list[dict]) -> list[dict]:
    """The tidy per-target table: cell fields, seed, target, and every record of :data:`RECORDS`."""
    rows = []
    for record in records:
        if record["status"] != "ok":
            continue
        for t, target in enumerate(record["targets"]):
            rows.append({**record["cell"], "kind": cell_field(record, "kind"), "target": target,
                         **{key: record["per_target"][key][t] for key in RECORDS if key in record["per_target"]}})
    return rows


def cross_rows(predictions: list[dict]) -> list[dict]:
    """Recognisability rows (judge accuracy on metamers vs references, bootstrap CIs over the
    targets of all seeds) per dataset."""
    rows = []
    for dataset in dict.fromkeys(p["dataset"] for p in predictions):
        matrix = recognisability_matrix(pooled(predictions, dataset), n_boot=N_BOOT)
        rows += [{"dataset": dataset, **row} for row in matrix]
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
