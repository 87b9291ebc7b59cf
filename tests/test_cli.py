"""The ``fastmetamer`` command line and the report helpers, run in-process."""
from __future__ import annotations

import json

import pytest
import torch

import fastmetamer as fm
from fastmetamer import MetamerResult
from fastmetamer.cli.main import main
from fastmetamer.report import markdown_table, plot_loss_curves, plot_neighbourhood

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"


def _assert_report(folder, rows: int) -> dict:
    """Check report.md, results.json and the PNGs in ``folder``; return results.json."""
    report = (folder / "report.md").read_text()
    assert "| node | kind | loss | passed |" in report
    payload = json.loads((folder / "results.json").read_text())
    assert len(payload["summary"]) == rows
    pngs = sorted(folder.glob("*.png"))
    assert (folder / "loss_curves.png") in pngs and len(pngs) >= 2
    for png in pngs:
        _assert_png(png)
        assert f"]({png.name})" in report
    return payload


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A GCN trained briefly by ``fastmetamer train``."""
    path = tmp_path_factory.mktemp("ckpt") / "gcn.pt"
    assert main(["--threads", "1", "train", "--model", "gcn", "--epochs", "15", "--hidden", "16",
                 "--out", str(path)]) == 0
    return path


def test_demo_quick_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads
    payload = _assert_report(out, rows=4)
    assert {row["kind"] for row in payload["summary"]} == {"features", "structure"}
    assert set(payload["results"]) == {"features", "structure"}
    stdout = capsys.readouterr().out
    assert "| node | kind | loss | passed | feature_cosine | wl_similarity | seconds |" in stdout
    assert "accuracy: train" in stdout


def test_train_then_generate(checkpoint, tmp_path, capsys):
    assert fm.models.load_checkpoint(checkpoint).config["hidden"] == 16
    out = tmp_path / "gen"
    assert main(["--threads", "1", "generate", "--checkpoint", str(checkpoint), "--node", "3",
                 "--node", "5", "--steps", "15", "--layer", "layers.0", "--out", str(out)]) == 0
    payload = _assert_report(out, rows=2)
    assert [row["node"] for row in payload["summary"]] == [3, 5]
    result = MetamerResult.load(out / "metamer_features.pt")
    assert result.nodes == [3, 5] and result.layer == "layers.0"
    assert result.history.shape[1] == 2
    assert "| 3 | features |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["frobnicate"], "invalid choice"),
    (["demo", "--nodes", "0"], "expected a positive integer"),
    (["train", "--model", "resnet", "--out", "x.pt"], "invalid choice"),
    (["train", "--dataset", "nosuchdata", "--out", "x.pt"], "unknown dataset"),
    (["generate", "--node", "1"], "--checkpoint"),
    (["generate", "--checkpoint", "{ckpt}"], "give the target node(s)"),
    (["generate", "--checkpoint", "missing.pt", "--node", "1"], "checkpoint not found"),
    (["generate", "--checkpoint", "{ckpt}", "--node", "99999"], "out of range"),
    (["generate", "--checkpoint", "{ckpt}", "--node", "1", "--layer", "nope"], "unknown layer"),
    (["generate", "--checkpoint", "{ckpt}", "--node", "1", "--kind", "colour"], "invalid choice"),
    (["generate", "--checkpoint", "{bogus}", "--node", "1"], "not a readable fastmetamer checkpoint"),
])
def test_bad_input_exits_2(argv, message, checkpoint, tmp_path, capsys):
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a checkpoint")
    argv = [a.format(ckpt=checkpoint, bogus=bogus) for a in argv]
    assert main(argv + ["--out", str(tmp_path / "o")] if argv[0] == "generate" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_for_every_command(capsys):
    for argv in (["--help"], ["demo", "--help"], ["train", "--help"], ["generate", "--help"]):
        assert main(argv) == 0
    assert "generate" in capsys.readouterr().out


def test_markdown_table_formats_cells():
    table = markdown_table([{"a": 0.123456, "b": True, "c": "x|y"}, {"a": 3}], ["a", "b", "c"])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 0.1235 | yes | x\\|y |",
                                  "| 3 |  |  |"]
    with pytest.raises(ValueError):
        markdown_table([], [])


def test_plot_loss_curves_from_tensors(tmp_path):
    path = plot_loss_curves({"a": torch.rand(10), "b": torch.rand(10, 3)}, tmp_path / "loss.png")
    _assert_png(path)
    with pytest.raises(TypeError):
        plot_loss_curves("nope", tmp_path / "bad.png")


def test_plot_neighbourhood_rejects_bad_target(checkpoint, tmp_path):
    graph = fm.datasets.load("synthetic")
    model = fm.models.load_checkpoint(checkpoint)
    result = fm.generate(model, graph, 7, steps=3)
    _assert_png(plot_neighbourhood(result, tmp_path / "n.png"))
    with pytest.raises(ValueError, match="target must be"):
        plot_neighbourhood(result, tmp_path / "n.png", target=1)
