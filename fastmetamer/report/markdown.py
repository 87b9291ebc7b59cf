"""Markdown tables and the report folder (``report.md`` + ``results.json``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..metamers.result import MetamerResult
from .summary import SUMMARY_COLUMNS


def _cell(value) -> str:
    """Format one table cell: floats with 4 significant digits, bools as yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], columns) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts) restricted to ``columns`` (keys, in
    order); missing keys give empty cells."""
    columns = list(columns)
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _markdown(summary_rows: list[dict], figures: dict[str, Path], meta: dict, folder: Path) -> str:
    """The text of ``report.md``."""
    parts = ["# fastmetamer report\n"]
    parts += [f"- **{key}**: {_cell(value)}" for key, value in meta.items()]
    parts += ["", "## Summary\n", markdown_table(summary_rows, SUMMARY_COLUMNS),
              "`loss`: final activation loss L_act of the hard metamer; `passed`: closer to the "
              "reference activation than any other real node; `feature_cosine` / `wl_similarity`: "
              "similarity of the receptive field's features / structure to the reference (1 = "
              "identical); `seconds`: wall time of the batched call for all targets of that kind.\n",
              "Full metrics and loss histories: `results.json`.\n", "## Figures\n"]
    for caption, path in figures.items():
        parts += [f"### {caption}\n", f"![{caption}]({Path(os.path.relpath(path, folder)).as_posix()})\n"]
    return "\n".join(parts)


def write_report(folder, summary_rows: list[dict], results: dict[str, MetamerResult],
                 figures: dict[str, Path], meta: dict | None = None) -> Path:
    """Write ``report.md`` (metadata, summary table, embedded figures) and ``results.json``
    (metadata, summary rows and every result's ``to_dict()``) into ``folder``.

    Args:
        folder: output directory (created if needed).
        summary_rows: rows of the summary table (see :func:`~fastmetamer.report.summary_rows`).
        results: label -> result.
        figures: caption -> PNG path (embedded relative to ``folder``).
        meta: optional key -> value facts about the run (model, dataset, accuracy, ...).

    Returns:
        the path of ``report.md``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    payload = {"meta": meta, "summary": summary_rows,
               "results": {label: res.to_dict() for label, res in results.items()}}
    (folder / "results.json").write_text(json.dumps(payload, indent=2))
    report = folder / "report.md"
    report.write_text(_markdown(summary_rows, figures, meta, folder))
    return report
