"""Robust accuracy of the study's adversarially trained models whose cells predate it.

Since issue 9 the study records, for every adversarially trained model, ``robust_test_acc``: the
test accuracy under a 20-step PGD attack in the training ball (``fastmetamer.study.cells.
robust_accuracy``). Cells written before that lack it, and their models were not kept. This script
re-trains each such model from its seed (``load_or_train``, same settings as the study), attacks
it, and writes into every cell record of the model: ``robust_test_acc``, ``attack`` and
``retrained_test_acc`` (the re-trained model's clean test accuracy: equal to the recorded
``test_acc`` when training reproduced bit for bit, else the size of the difference shows how close
the re-trained model is to the one the cells' metamers were made from).

Usage: ``.venv/bin/python docs/results/robust_accuracy.py DATASET [DATASET ...]`` (e.g. ``Cora MUTAG``);
models are done cheapest first (recorded training seconds), each one's cells written as soon as
it is done, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fastmetamer.study.cells import DataCache, load_or_train
from fastmetamer.study.config import ModelSpec, StudyConfig

FOLDER = Path(__file__).resolve().parent / "study"


def study_config() -> StudyConfig:
    """The committed study's configuration (``study/config.json``)."""
    raw = json.loads((FOLDER / "config.json").read_text())
    return StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def cells_lacking_robust_accuracy(datasets: list[str]) -> dict[ModelSpec, list[Path]]:
    """Cell files of adversarially trained models of ``datasets`` without ``robust_test_acc``,
    grouped by model."""
    groups: dict[ModelSpec, list[Path]] = {}
    for path in sorted((FOLDER / "cells").glob("*.json")):
        record = json.loads(path.read_text())
        cell = record.get("cell") if isinstance(record, dict) else None
        if (cell is None or record.get("status") != "ok" or cell["dataset"] not in datasets
                or "adversarial" not in cell["mitigation"] or "robust_test_acc" in record["model"]):
            continue
        spec = ModelSpec(cell["dataset"], cell["arch"], cell["mitigation"], cell["depth"], cell["width"], cell["seed"])
        groups.setdefault(spec, []).append(path)
    return groups


def main(datasets: list[str]) -> None:
    config = study_config()
    data = DataCache(config)
    groups = cells_lacking_robust_accuracy(datasets)
    recorded = {spec: json.loads(paths[0].read_text())["model"]["seconds"] for spec, paths in groups.items()}
    for spec in sorted(groups, key=recorded.get):
        started = time.perf_counter()
        _, info = load_or_train(spec, data(spec.dataset), config, FOLDER)
        for path in groups[spec]:
            record = json.loads(path.read_text())
            record["model"].update(robust_test_acc=info["robust_test_acc"], attack=info["attack"],
                                   retrained_test_acc=info["test_acc"])
            path.write_text(json.dumps(record))
        print(f"{spec.key}: test {json.loads(groups[spec][0].read_text())['model']['test_acc']:.3f} "
              f"(re-trained {info['test_acc']:.3f}), robust {info['robust_test_acc']:.3f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
