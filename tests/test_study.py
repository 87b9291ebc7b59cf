"""The invariance study: grid, quick run outputs, resumability, skipped graph-level cells, CLI."""
from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

import fastmetamer as fm
from fastmetamer.cli import dimension as dimension_command, study as study_command
from fastmetamer.study import run_study
from fastmetamer.study import cells as study_cells
from fastmetamer.study import crossarch
from fastmetamer.study.crossarch import source_cells
from fastmetamer.study.config import (ARCHITECTURES, StudyConfig, cells, check_mitigation, full_config,
                                      mitigation_names, model_specs, quick_config)

SMALL = dict(quick=True, architectures=["gcn", "gat"], targets=4, steps=40)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: much faster for these tiny problems on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A small quick study, run once for the module."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("study")
    return out, run_study(out, **SMALL)


def test_mitigations_are_every_combination():
    names = mitigation_names()
    assert names[0] == "none" and len(names) == 8 and "elu+residual+adversarial" in names
    for bad in ["relu", "elu+elu", "", "elu+"]:
        with pytest.raises(ValueError, match="mitigation"):
            check_mitigation(bad)
    with pytest.raises(ValueError, match="architecture"):
        StudyConfig(datasets=("synthetic",), architectures=("transformer",))


def test_full_grid():
    config = full_config()
    specs = model_specs(config)
    node = [s for s in specs if s.dataset == "Cora"]
    base = [s for s in node if s.depth == 2 and s.width == 64]
    assert len(base) == len(ARCHITECTURES) * 8
    assert {(s.depth, s.width) for s in node if s.arch == "gcn" and s.mitigation == "none"} == \
        {(2, 64), (3, 64), (4, 64), (2, 16), (2, 256)}
    assert {s.arch for s in node if (s.depth, s.width) != (2, 64)} == {"gcn", "graphsage"}
    sgc = next(s for s in node if s.arch == "sgc" and s.depth == 2)
    assert sgc.build_kwargs()["K"] == 2 and sgc.build_kwargs()["depth"] == 1
    graph_cells = [c for c in cells(config) if c.model.dataset == "MUTAG"]
    assert graph_cells and {c.layer for c in graph_cells} == {"readout"}
    gcn_layers = [c.layer for c in cells(config) if c.model == base[0] and c.kind == "features"]
    assert gcn_layers == ["layers.0", "layers.1"]
    assert len({c.key for c in cells(config)}) == len(cells(config))
    order = [c.model.dataset for c in cells(config)]
    assert order == sorted(order, key=list(dict.fromkeys(order)).index)  # dataset by dataset
    structure = [c for c in cells(config) if c.kind == "structure"]
    assert {c.model.arch for c in structure if c.model.dataset == "Cora"} == set(ARCHITECTURES) - {"mlp"}
    assert all(c.model.task == "node" and c.is_output and c.model.mitigation == "none" for c in structure)


def test_quick_study_writes_tables_figures_and_report(quick_run):
    out, report = quick_run
    assert report == out / "study.md"
    text = report.read_text()
    assert "## Cross-architecture recognisability" in text and "0 failed" in text
    with open(out / "study.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["dataset"] for r in rows} == {"synthetic", "synthetic_graphs"}
    assert {r["mitigation"] for r in rows} == {"none", "elu+adversarial"}
    assert {"consistency", "consistency_lo", "consistency_hi", "passed", "dimension", "log_volume"} <= set(rows[0])
    assert all(float(r["consistency_lo"]) <= float(r["consistency"]) <= float(r["consistency_hi"]) for r in rows)
    with open(out / "cross_architecture.csv") as handle:
        cross = list(csv.DictReader(handle))
    assert len(cross) == 2 * 2 * 2  # datasets x sources x judges
    # shuffled-features control: every judge also classifies the references with shuffled features
    assert all(0.0 <= float(r["shuffled_ci_low"]) <= float(r["shuffled_acc"]) <= float(r["shuffled_ci_high"]) <= 1.0
               for r in cross)
    assert "shuffled_acc" in text
    pngs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"layer_consistency.png", "dimension_histograms.png", "cross_architecture.png",
            "loss_curves.png"} <= pngs and any(p.startswith("neighbourhood_") for p in pngs)
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json") if not p.name.startswith("cross")]
    assert records and all(r["status"] == "ok" for r in records)
    node = next(r for r in records if r["cell"]["task"] == "node" and r["cell"]["kind"] == "features")
    assert len(node["targets"]) == 4 and len(node["per_target"]["dimension"]) == 4


def test_quick_study_counts_trivial_targets_apart(quick_run):
    """Every cell records ``trivial`` per target; a trivial target never passes and has no
    consistency; the tables carry the number of trivial targets as its own column."""
    out, report = quick_run
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json") if not p.name.startswith("cross")]
    for record in records:
        per_target = record["per_target"]
        assert len(per_target["trivial"]) == len(record["targets"])
        for trivial, passed, c in zip(per_target["trivial"], per_target["passed"], per_target["consistency"]):
            assert trivial in (0.0, 1.0) and not (trivial and passed)
            assert (c == c) == (passed and not trivial)  # C is NaN unless passed and non-trivial
    with open(out / "study.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"targets", "trivial", "trivial_derived"} <= set(rows[0])
    assert all(0 <= int(r["trivial"]) <= int(r["targets"]) and r["trivial_derived"] == "False" for r in rows)
    text = report.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| dataset | arch | mitigation"))
    assert "| targets | trivial |" in header
    structure = text.split("## Structure metamers")[1].split("##")[0]
    assert "| trivial |" in structure and "trivial targets (identical to their reference" in text


def test_adversarially_trained_models_record_robust_accuracy(quick_run):
    """Models trained with PGD carry their robust test accuracy (a stronger PGD attack in the
    training ball); the others do not."""
    out, report = quick_run
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json") if not p.name.startswith("cross")]
    for record in records:
        model = record["model"]
        if "adversarial" in record["cell"]["mitigation"]:
            assert 0.0 <= model["robust_test_acc"] <= 1.0 and model["attack"]["steps"] == study_cells.ROBUST_PGD_STEPS
        else:
            assert "robust_test_acc" not in model
    with open(out / "study.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert all((r["robust_accuracy"] != "nan") == ("adversarial" in r["mitigation"]) for r in rows)


def test_robust_accuracy_drops_under_attack():
    data = fm.datasets.load("synthetic", num_nodes=200, num_features=50)
    torch.manual_seed(0)
    model = fm.models.build_model("gcn", data.num_features, int(data.y.max()) + 1, hidden=16)
    trained = fm.models.train(model, data, epochs=30, seed=0).model
    weak = study_cells.robust_accuracy(trained, data, {"norm": "l2", "eps": 1e-6}, seed=0, steps=2)
    strong = study_cells.robust_accuracy(trained, data, {"norm": "l2", "eps": 50.0}, seed=0, steps=10)
    with torch.no_grad():
        accuracy = float((trained(data.x, data.edge_index).argmax(1) == data.y)[data.test_mask].double().mean())
    assert weak == pytest.approx(accuracy, abs=1e-9)
    assert strong < accuracy


def _old_record(kind: str, passed, consistency, **metrics) -> dict:
    """A cell record as written before ``trivial`` existed (C reported for every target)."""
    targets = list(range(len(passed)))
    cell = dict(dataset="Cora", task="node", arch="gcn", mitigation="none", depth=2, width=64, seed=0,
                layer="convs.1", kind=kind)
    per_target = {"loss": [0.0 if t else 1e-3 for t in metrics.pop("same")], "passed": passed,
                  "consistency": consistency, "dimension": [5.0] * len(passed), **metrics}
    return {"key": "old", "cell": cell, "model": {"test_acc": 0.8}, "status": "ok", "targets": targets,
            "per_target": per_target}


def test_trivial_target_does_not_count_as_a_pass_in_the_table():
    """Old cell files (no ``trivial`` record): a feature metamer identical to its reference
    (relative L2 0, cosine 1) or a structure metamer with edge Jaccard 1 is derived trivial; it
    is counted apart, is no pass, and its consistency does not enter the mean."""
    from fastmetamer.study.tables import per_target, summary_rows, target_rows

    features = _old_record("features", passed=[1.0, 1.0, 0.0, 1.0], consistency=[1.0, 0.2, 0.9, 0.4],
                           same=[True, False, False, False], relative_l2=[0.0, 1.3, 1.2, 1.4],
                           feature_cosine=[1.0, 0.1, 0.2, 0.05])
    row = summary_rows([features])[0]
    assert row["targets"] == 4 and row["trivial"] == 1 and row["trivial_derived"] is True
    assert row["passed"] == pytest.approx(2 / 3)  # 2 of the 3 non-trivial targets
    assert row["consistency"] == pytest.approx(0.3)  # passed, non-trivial targets only: 0.2 and 0.4
    assert row["feature_cosine"] == pytest.approx((0.1 + 0.2 + 0.05) / 3)  # metamer metrics: non-trivial
    assert row["dimension"] == pytest.approx(5.0)  # target properties: all targets
    fixed = per_target(features)
    assert fixed["trivial"] == [1.0, 0.0, 0.0, 0.0] and fixed["passed"] == [0.0, 1.0, 0.0, 1.0]
    assert [c == c for c in fixed["consistency"]] == [False, True, False, True]
    rows = target_rows([features])
    assert rows[0]["trivial"] == 1.0 and rows[0]["passed"] == 0.0 and rows[0]["trivial_derived"] == 1.0

    structure = _old_record("structure", passed=[1.0, 1.0], consistency=[1.0, 0.5], same=[True, False],
                            feature_cosine=[1.0, 1.0], edge_jaccard=[1.0, 0.3])
    row = summary_rows([structure])[0]
    assert row["trivial"] == 1 and row["passed"] == pytest.approx(1.0) and row["consistency"] == pytest.approx(0.5)

    new = dict(features, per_target={**features["per_target"], "trivial": [0.0, 0.0, 0.0, 1.0],
                                     "passed": [1.0, 1.0, 0.0, 0.0],
                                     "consistency": [1.0, 0.2, float("nan"), float("nan")]})
    row = summary_rows([new])[0]  # the library's own flag wins over the derivation
    assert row["trivial"] == 1 and row["trivial_derived"] is False
    assert row["passed"] == pytest.approx(2 / 3) and row["consistency"] == pytest.approx(0.6)


def test_quick_study_has_structure_cells(quick_run):
    """Structure metamers of the node models that use edges (output layer, no mitigation):
    features untouched, edges rearranged, reported in their own table."""
    out, report = quick_run
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*-structure.json")]
    assert {r["cell"]["arch"] for r in records} == {"gcn", "gat"}
    for record in records:
        cell, per_target = record["cell"], record["per_target"]
        assert cell["task"] == "node" and cell["mitigation"] == "none" and cell["kind"] == "structure"
        assert len(per_target["edge_jaccard"]) == 4 and all(0 <= j <= 1 for j in per_target["edge_jaccard"])
        assert all(abs(c - 1) < 1e-6 for c in per_target["feature_cosine"])  # features fixed
        assert min(per_target["edge_jaccard"]) < 1  # some edges moved
    text = report.read_text()
    assert "## Structure metamers" in text
    with open(out / "study.csv") as handle:
        kinds = {r["kind"] for r in csv.DictReader(handle)}
    assert kinds == {"features", "structure"}


def test_rerun_skips_finished_cells(quick_run, monkeypatch):
    out, _ = quick_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(study_cells, "generate", refuse)
    monkeypatch.setattr(study_cells.models, "train", refuse)
    run_study(out, **SMALL)
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


def test_missing_saved_metamers_are_recreated(quick_run):
    """A study resumed without its saved metamers (not in version control) re-creates them for
    the cross-architecture matrix."""
    out, _ = quick_run
    saved = sorted(p for p in (out / "metamers").glob("synthetic-*.pt") if "structure" not in p.name)
    assert saved
    saved[0].unlink()
    for cached in (out / "cells").glob("cross-*.json"):
        cached.unlink()
    run_study(out, **SMALL)
    assert saved[0].is_file()
    assert len(list((out / "cells").glob("cross-*.json"))) == 2


def test_cached_predictions_get_the_shuffled_control(quick_run, monkeypatch):
    """Prediction rows cached before the shuffled-features control existed get it filled in from
    the cell records and judges alone (the metamer predictions are not recomputed), equal to a fresh computation."""
    out, _ = quick_run
    paths = sorted((out / "cells").glob("cross-*.json"))
    fresh = {p: json.loads(p.read_text()) for p in paths}
    for path, rows in fresh.items():
        path.write_text(json.dumps([{k: v for k, v in row.items() if k != "shuffled"} for row in rows]))

    def refuse(*args, **kwargs):
        raise AssertionError("the predictions on saved metamers were recomputed")

    monkeypatch.setattr(crossarch, "predictions", refuse)
    run_study(out, **SMALL, report_only=True)
    assert {p: json.loads(p.read_text()) for p in paths} == fresh


def test_report_only_runs_nothing(quick_run, tmp_path, monkeypatch):
    """--report-only reports the finished cells and computes none."""
    def refuse(*args, **kwargs):
        raise AssertionError("report_only ran a cell")

    monkeypatch.setattr(study_cells, "generate", refuse)
    monkeypatch.setattr(study_cells.models, "train", refuse)
    assert "cells: 0 ok" in run_study(tmp_path, **SMALL, report_only=True).read_text()
    out, report = quick_run
    finished = len([p for p in (out / "cells").glob("*.json") if not p.name.startswith("cross")])
    assert f"cells: {finished} ok" in run_study(out, **SMALL, report_only=True).read_text()


def test_graph_level_failure_is_skipped_then_retried(tmp_path, monkeypatch):
    options = dict(quick=True, datasets=["synthetic_graphs"], architectures=["gcn"], mitigations=["none"],
                   depths=[2], widths=[64], targets=2, steps=10)
    real = study_cells.generate

    def unsupported(model, graph, node, **kwargs):
        if node is None:
            raise NotImplementedError("graph-level metamers are not supported yet")
        return real(model, graph, node, **kwargs)

    monkeypatch.setattr(study_cells, "generate", unsupported)
    text = run_study(tmp_path, **options).read_text()
    assert "skipped" in text and "graph-level metamers are not supported yet" in text
    monkeypatch.setattr(study_cells, "generate", real)
    assert "1 ok, 0 skipped" in run_study(tmp_path, **options).read_text()


def test_exclude_patterns_leave_cells_out():
    config = full_config(exclude=("Cora-appnp-*-layers.2*",))
    keys = [c.key for c in cells(config)]
    assert not [k for k in keys if k.startswith("Cora-appnp-") and "layers.2" in k]
    assert "Cora-appnp-none-d2-w64-s0-layers.1" in keys and "CiteSeer-appnp-none-d2-w64-s0-layers.2" in keys
    assert len(keys) == len(cells(full_config())) - 9  # 8 mitigations + the structure cell
    assert "appnp" not in {c.model.arch for c in source_cells(config, "Cora", 0)}
    assert "appnp" in {c.model.arch for c in source_cells(config, "CiteSeer", 0)}
    with pytest.raises(ValueError, match="exclude"):
        StudyConfig(datasets=("synthetic",), exclude=("",))


def test_excluded_output_layer_is_not_reported_as_output(tmp_path):
    """With a model's output layer excluded, its first layer does not stand in for the output,
    the cross-architecture matrix has no metamers from it, and the report names the pattern."""
    text = run_study(tmp_path, quick=True, datasets=["synthetic"], architectures=["gcn", "gat"],
                     mitigations=["none"], depths=[2], widths=[64], targets=3, steps=10, structure_targets=0,
                     exclude=["*-gat-*-layers.1"]).read_text()
    assert {p.stem for p in (tmp_path / "cells").glob("synthetic-gat-*")} == {"synthetic-gat-none-d2-w64-s0-layers.0"}
    output_table = text.split("## Output layer")[1].split("## Per matched layer")[0]
    assert "| gcn |" in output_table and "| gat |" not in output_table
    assert "*-gat-*-layers.1" in text
    with open(tmp_path / "cross_architecture.csv") as handle:
        assert {r["source"] for r in csv.DictReader(handle)} == {"gcn"}


def parser_with(add) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add(parser.add_subparsers(dest="command"))
    return parser


def test_study_parser_maps_arguments(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(study_command, "run_study", lambda out, **kw: seen.update(out=out, **kw) or tmp_path / "study.md")
    args = parser_with(study_command.add_parser).parse_args(
        ["study", "--quick", "--out", str(tmp_path), "--architectures", "GCN", "gin", "--mitigations", "none",
         "elu+residual", "--depths", "2", "3", "--steps", "5", "--exclude", "Cora-gin-*"])
    assert args.run(args) == 0
    assert seen["quick"] and seen["architectures"] == ["gcn", "gin"] and seen["steps"] == 5
    assert seen["mitigations"] == ["none", "elu+residual"] and seen["depths"] == [2, 3]
    assert seen["exclude"] == ["Cora-gin-*"]
    assert "study.md" in capsys.readouterr().out


def test_dimension_command(tmp_path, capsys):
    graph = fm.datasets.load("synthetic")  # what the command loads
    model = fm.models.GCN(graph.num_features, int(graph.y.max()) + 1, hidden=8)
    fm.models.save_checkpoint(model, tmp_path / "ckpt.pt")
    args = parser_with(dimension_command.add_parser).parse_args(
        ["dimension", "--checkpoint", str(tmp_path / "ckpt.pt"), "--node", "3", "--node", "5",
         "--out", str(tmp_path / "dim")])
    assert args.run(args) == 0
    payload = json.loads((tmp_path / "dim" / "dimension.json").read_text())
    assert payload["nodes"] == [3, 5] and len(payload["dimension"]) == 2
    assert (tmp_path / "dim" / "dimension.png").is_file() and (tmp_path / "dim" / "dimension.md").is_file()
    assert "2 targets" in capsys.readouterr().out


def test_quick_config_is_small():
    config = quick_config()
    assert config.datasets == ("synthetic", "synthetic_graphs") and len(config.mitigations) == 2
    assert len(cells(config)) < 40
