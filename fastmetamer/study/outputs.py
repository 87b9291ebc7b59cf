"""Writing the study's results: CSV tables, PNG figures and the Markdown report ``study.md``."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..report import plot_neighbourhood
from . import figures
from .config import Cell, ModelSpec, StudyConfig, is_base
from .tables import cell_field, cross_rows, markdown, summary_rows, target_rows, write_csv

DEFINITIONS = """\
Definitions. Each cell optimises feature metamers of its targets (all in one batched call) at
its matched layer. `targets`: targets of the cell (all seeds); `trivial`: how many of them are
*trivial*, i.e. their metamer came back identical to the reference over the receptive field
(e.g. no ones to move, no free edge slot): a trivial target is never a pass and is left out of
every metamer metric below (cells marked `*` in `trivial` predate the library's own flag: there
it is derived from the records as relative L2 distance 0, or edge Jaccard 1 for structure).
`passed`: share of the non-trivial targets whose metamer activation is closer to the reference
than any other real node's (graph's) activation; `loss`: final relative activation loss L_act;
`act_cosine` / `feature_cosine`: cosine similarity of activations / input features (receptive
field) to the reference; consistency C = 1 - |S_match - S_in| with S_match the activation cosine
and S_in the feature cosine (both clipped to [0, 1]), averaged over the passed, non-trivial
targets only (C is undefined for the others): low C = the model calls very different inputs the
same; `relevant`: share of the non-trivial metamers with S_match >= 0.99 and S_in <= 0.5; `dimension` D_v = |R| d - rank J_v (local dimension of the metamer manifold),
`dimension_ratio` = D_v / (|R| d), `rank_deficit` = d_l - rank J_v, `log_volume` = sum of the log
singular values of J_v (these four over all targets). Brackets: 95% percentile-bootstrap CIs over targets pooled over seeds;
`accuracy`: test accuracy of the trained model (mean over seeds); `robust_accuracy`:
for adversarially trained models, test accuracy under a 20-step PGD attack in the training ball
(empty where the model was trained before this was recorded). Scale-aware feature distances
(cosine hides how many features are on and how large they are): `relative_l2` =
||X' - X||_F / ||X||_F over the receptive field; `marginal_w1` = mean over features of the 1-D
Wasserstein-1 distance between the value distributions of a feature in X' and in X (for binary
features: the mean |frequency difference| of the words). `snr_db`: activation SNR
10 log10(||H||^2 / ||H' - H||^2).
"""


STRUCTURE_NOTE = """\
Features fixed, edges among the receptive field free (the same number of edges). {targets}
targets per cell, {steps} steps (then a discrete edge-swap search). A target counts as a structure
metamer only when it passes the null criterion above and is not trivial (a target with no free
edge slot, or whose edges came back unchanged, is counted in `trivial`); a failed target shows
that this optimiser did not find one, not that none exists. `edge_jaccard` / `wl_similarity`: edge-set Jaccard and WL-subtree similarity to the
reference receptive field; `dimension_ratio` is taken w.r.t. the edge weights within R.
"""


def write_study_report(config: StudyConfig, folder: Path, records: list[dict], predictions: list[dict],
                       unavailable: dict[str, str]) -> Path:
    """Write ``study.csv``, ``targets.csv``, ``cross_architecture.csv``, ``figures/*.png`` and
    ``study.md`` into ``folder``; returns the report path."""
    summary, cross = summary_rows(records), cross_rows(predictions)
    write_csv(folder / "study.csv", summary)
    write_csv(folder / "targets.csv", target_rows(records))
    write_csv(folder / "cross_architecture.csv", cross)
    pictures = _figures(folder, records, summary, cross)
    text = _markdown(config, records, summary, cross, unavailable, pictures, folder)
    report = folder / "study.md"
    report.write_text(text)
    return report


def _base_none(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["mitigation"] == "none" and r["depth"] == 2 and r["width"] == 64
            and r["kind"] == "features"]


def _output_records(records: list[dict]) -> list[dict]:
    """Records of the output layer of base-grid models without mitigation."""
    def output(record):
        spec = ModelSpec(**{k: record["cell"][k] for k in ("dataset", "arch", "mitigation", "depth",
                                                          "width", "seed")})
        return Cell(spec, record["cell"]["layer"]).is_output and spec.mitigation == "none" and is_base(spec)

    return [r for r in records if r["status"] == "ok" and cell_field(r, "kind") == "features" and output(r)]


def _figures(folder: Path, records, summary, cross) -> dict[str, Path]:
    """Caption -> PNG path of every figure there is data for."""
    out, pictures = folder / "figures", {}
    layered = [r for r in _base_none(summary) if r["task"] == "node"]
    if layered:
        pictures["Consistency per matched layer"] = figures.layer_consistency(layered, out / "layer_consistency.png")
    finals = _output_records(records)
    if finals:
        pictures["Metamer dimension and volume (output layer)"] = figures.dimension_histograms(
            target_rows(finals), out / "dimension_histograms.png")
        pictures["Loss curves (output layer)"] = figures.loss_curves(finals, out / "loss_curves.png")
    if cross:
        pictures["Cross-architecture recognisability"] = figures.cross_architecture(
            cross, out / "cross_architecture.png")
    pictures.update(_neighbourhoods(folder, finals))
    return pictures


def _neighbourhoods(folder: Path, finals: list[dict]) -> dict[str, Path]:
    """Original vs metamer receptive field of the first target of the first node-level
    output-layer cell of each dataset."""
    pictures, seen = {}, set()
    for record in finals:
        dataset = record["cell"]["dataset"]
        if record["cell"]["task"] != "node" or dataset in seen:
            continue
        seen.add(dataset)
        saved_path = folder / "metamers" / f"{record['key']}.pt"
        path = folder / "figures" / f"neighbourhood_{record['key']}.png"
        caption = f"Neighbourhood: {record['key']}, node {record['targets'][0]}"
        if saved_path.is_file():
            saved = torch.load(saved_path, weights_only=False)
            pictures[caption] = plot_neighbourhood(saved["results"][0], path, 0)
        elif path.is_file():  # drawn in an earlier sitting whose saved metamers are gone
            pictures[caption] = path
    return pictures


def _markdown(config, records, summary, cross, unavailable, pictures, folder) -> str:
    status = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "error")}
    metrics = ("passed", "consistency", "relevant", "feature_cosine", "relative_l2", "marginal_w1",
               "dimension_ratio", "log_volume")
    all_rows = summary
    structure = [r for r in summary if r["kind"] == "structure"]
    summary = [r for r in summary if r["kind"] == "features"]
    base = [r for r in summary if r["depth"] == 2 and r["width"] == 64]
    outputs = [r for r in base if r["layer"] in ("readout", _last_layer(r))]
    sweeps = [r for r in summary if r["mitigation"] == "none" and r["arch"] in config.sweep_architectures
              and r["layer"] == _last_layer(r)]
    parts = [
        "# fastmetamer invariance study\n",
        f"- datasets: {', '.join(config.datasets)}; architectures: {', '.join(config.architectures)}",
        f"- mitigations: {', '.join(config.mitigations)}; seeds: {config.seeds} (from {config.seed}); "
        f"targets per cell: {config.targets}; steps: {config.steps}",
        f"- cells: {status['ok']} ok, {status['skipped']} skipped, {status['error']} failed",
        f"- excluded cells (patterns of cell keys): {', '.join(config.exclude) or 'none'}",
        f"- trivial targets (identical to their reference, never a pass): "
        f"{sum(int(r['trivial']) for r in all_rows)} of {sum(int(r['targets']) for r in all_rows)}; "
        f"derived from the records (cell files older than the library's flag) in "
        f"{sum(bool(r['trivial_derived']) for r in all_rows)} of {len(all_rows)} table rows\n",
        DEFINITIONS,
        "## Output layer: architectures x mitigations (depth 2, width 64)\n",
        markdown(_marked(outputs), ("dataset", "arch", "mitigation", "accuracy", "robust_accuracy", "targets",
                                    "trivial"), metrics),
        "## Per matched layer (no mitigation, depth 2, width 64)\n",
        markdown(_marked(_base_none(summary)), ("dataset", "arch", "layer", "targets", "trivial"),
                 ("passed", "consistency", "act_cosine", "dimension", "log_volume")),
        "## Depth and width sweeps (output layer, no mitigation)\n",
        markdown(_marked(sweeps), ("dataset", "arch", "depth", "width", "accuracy", "targets", "trivial"),
                 ("passed", "consistency", "log_volume")),
        "## Structure metamers (output layer, no mitigation, depth 2, width 64)\n",
        STRUCTURE_NOTE.format(targets=config.structure_targets, steps=config.structure_steps),
        markdown(_marked(structure), ("dataset", "arch", "accuracy", "targets", "trivial"),
                 ("passed", "loss", "edge_jaccard", "wl_similarity", "consistency", "dimension_ratio")),
        "## Cross-architecture recognisability\n",
        "Judge B's accuracy on metamers made from source A at A's output layer, and on the references; "
        "control `shuffled_acc`: B's accuracy on the references with their features shuffled across nodes "
        "(edges kept), a floor for recognisability (empty for predictions cached before the control).\n",
        markdown(_ci_columns(cross), ("dataset", "source", "judge", "n"), ("metamer_acc", "reference_acc",
                                                                            "shuffled_acc")),
    ]
    parts += _problems(records, unavailable)
    parts += ["## Figures\n"] + [f"### {caption}\n\n![{caption}]({Path(os.path.relpath(path, folder)).as_posix()})\n"
                                 for caption, path in pictures.items()]
    return "\n".join(parts)


def _marked(rows: list[dict]) -> list[dict]:
    """Rows with ``trivial`` shown as ``n*`` where it was derived from old cell records, and
    ``robust_accuracy`` blank where there is none."""
    def robust(r):
        value = r.get("robust_accuracy")
        return None if value is None or value != value else value

    return [{**r, "trivial": f"{r['trivial']}*" if r.get("trivial_derived") else r["trivial"],
             "robust_accuracy": robust(r)} for r in rows]


def _last_layer(row: dict) -> str:
    """The output layer of ``row``'s model (also when that cell is excluded or unfinished)."""
    return ModelSpec(*(row[k] for k in ("dataset", "arch", "mitigation", "depth", "width")), 0).output_layer()


def _ci_columns(rows: list[dict]) -> list[dict]:
    """Cross rows with ``*_lo`` / ``*_hi`` keys (as the summary rows have) for Markdown."""
    metrics = ("metamer_acc", "reference_acc", "shuffled_acc")
    return [{**r, **{f"{m}_lo": r.get(f"{m[:-4]}_ci_low") for m in metrics},
             **{f"{m}_hi": r.get(f"{m[:-4]}_ci_high") for m in metrics}} for r in rows]


def _problems(records, unavailable) -> list[str]:
    """Markdown listing unavailable datasets and skipped / failed cells with their reasons."""
    rows = [{"what": name, "status": "dataset unavailable", "reason": why} for name, why in unavailable.items()]
    rows += [{"what": r["key"], "status": r["status"], "reason": r["reason"]}
             for r in records if r["status"] != "ok"]
    return ["## Skipped and failed\n", markdown(rows, ("what", "status", "reason"))] if rows else []
