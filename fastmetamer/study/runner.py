"""``run_study``: the whole invariance study in one call, resumable cell by cell (SPEC §6).

Output folder layout::

    cells/<cell>.json          one record per finished cell (rerun skips cells with status "ok")
    cells/cross-<data>-s<seed>.json   cross-architecture predictions
    models/, metamers/         checkpoints and saved metamers (see :mod:`.cells`)
    study.csv, targets.csv, cross_architecture.csv, study.md, figures/*.png
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

from tqdm.auto import tqdm

from .. import distributed
from . import crossarch
from .cells import DataCache, run_cell, write_atomically
from .config import Cell, StudyConfig, cells, full_config, quick_config
from .outputs import write_study_report


def run_study(out_dir, *, quick: bool = False, datasets=None, architectures=None, mitigations=None,
              depths=None, widths=None, sweep_architectures=None, targets: int | None = None,
              steps: int | None = None, seeds: int | None = None, root=None, seed: int = 0,
              progress: bool | None = None, report_only: bool = False, **settings) -> Path:
    """Run the invariance study (datasets x architectures x mitigations x matched layers, plus
    depth and width sweeps) and write its tables, figures and report into ``out_dir``.

    Args:
        out_dir: output folder (created; finished cells found there are not recomputed).
        quick: the CI-sized preset (:func:`~.config.quick_config`) instead of the full one.
        datasets, architectures, mitigations, depths, widths, sweep_architectures, targets,
            steps, seeds: override the preset (see :class:`~.config.StudyConfig`); None keeps it.
        root: data folder for PyG datasets; seed: base seed; progress: tqdm bar (None: on a tty).
        report_only: run no cell; write the report from the cells finished so far (e.g. while
            a long study is still running, or between sittings). Cached cross-architecture rows
            that lack the shuffled-features control get it (a few forward passes, and judges
            re-trained from their seeds where their checkpoints are gone).
        **settings: any other :class:`~.config.StudyConfig` field (``epochs``, ``adversarial``,
            ``null_graphs``, ``dataset_options``, ``exclude``).

    Returns:
        the path of the Markdown report ``study.md``.
    """
    overrides = dict(datasets=datasets, architectures=architectures, mitigations=mitigations,
                     depths=depths, widths=widths, sweep_architectures=sweep_architectures,
                     targets=targets, steps=steps, seeds=seeds)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    config = (quick_config if quick else full_config)(root=root, seed=seed, progress=progress,
                                                      **overrides, **settings)
    return run_config(config, out_dir, report_only=report_only)


def run_config(config: StudyConfig, out_dir, report_only: bool = False) -> Path:
    """Run the study described by ``config`` into ``out_dir`` (with ``report_only``, only report
    the cells finished there); returns the report path."""
    folder = Path(out_dir)
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "config.json", json.dumps(config.to_dict(), indent=2))
    data = DataCache(config)
    unavailable = _unavailable(config, data)
    todo = [c for c in cells(config) if c.model.dataset not in unavailable]
    if not report_only:
        mine = my_cells(todo)
        with distributed.alone():
            for c in tqdm(mine, desc="study cells", disable=_tqdm_disable(config)):
                _cell(c, config, data, folder)
        distributed.wait_for_all()
    records = [r for r in (_recorded(c, folder) for c in todo)
               if r is not None and (not report_only or r.get("status") == "ok")]
    if not distributed.is_main_rank():
        return folder / "study.md"
    with distributed.alone():
        predictions = _cross(config, data, folder, unavailable, restore=not report_only)
        return write_study_report(config, folder, records, predictions, unavailable)


def my_cells(todo: list[Cell]) -> list[Cell]:
    """The cells this rank runs: all of them outside a process group; inside one, the cells of
    every model (cells that share a trained model stay together), dealt out to the ranks in
    turn. A rank that dies loses only the cell it was running: finished cells are files, and a
    rerun skips them."""
    rank, size = distributed.world()
    if size == 1:
        return todo
    keys = list(dict.fromkeys(c.model.key for c in todo))
    mine = set(keys[rank::size])
    return [c for c in todo if c.model.key in mine]


def _tqdm_disable(config: StudyConfig) -> bool | None:
    """tqdm's ``disable``: None shows the bar only on a terminal."""
    return None if config.progress is None else not config.progress


def _unavailable(config: StudyConfig, data: DataCache) -> dict[str, str]:
    """Datasets that cannot be loaded (e.g. raw files absent offline) -> reason."""
    missing = {}
    for name in config.datasets:
        try:
            data(name)
        except FileNotFoundError as err:
            missing[name] = str(err).splitlines()[0]
    return missing


def _recorded(cell: Cell, folder: Path) -> dict | None:
    """The cell's record (any status) if one was written, else None."""
    path = folder / "cells" / f"{cell.key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _finished(cell: Cell, folder: Path) -> dict | None:
    """The cell's record if it finished before (status "ok"), else None."""
    record = _recorded(cell, folder)
    return record if record is not None and record.get("status") == "ok" else None


def _cell(cell: Cell, config: StudyConfig, data: DataCache, folder: Path) -> dict:
    """The cell's record: read from ``cells/`` when it finished before, else run and saved.
    A graph-level cell the core cannot run yet is recorded as "skipped", any other failure as
    "error" (both are retried on the next run)."""
    finished = _finished(cell, folder)
    if finished is not None:
        return finished
    path = folder / "cells" / f"{cell.key}.json"
    try:
        record = run_cell(cell, config, data, folder)
    except Exception as err:  # noqa: BLE001 - one failing cell must not end a long study
        graph_level = cell.model.task == "graph" and isinstance(err, (NotImplementedError, ValueError, TypeError))
        record = {"key": cell.key, "cell": cell.to_dict(), "status": "skipped" if graph_level else "error",
                  "reason": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc(limit=-3)}
    write_atomically(path, json.dumps(record))
    return record


def _cross(config: StudyConfig, data: DataCache, folder: Path, unavailable, restore: bool) -> list[dict]:
    """Cross-architecture predictions of every dataset and seed (cached in ``cells/`` once every
    architecture's metamers exist); with ``restore``, missing saved metamers are re-created."""
    rows = []
    for dataset in (d for d in config.datasets if d not in unavailable):
        for seed in range(config.seed, config.seed + config.seeds):
            path = folder / "cells" / f"cross-{dataset}-s{seed}.json"
            cached = json.loads(path.read_text()) if path.is_file() else []
            sources = {cell.model.arch for cell in crossarch.source_cells(config, dataset, seed)}
            if {row["source"] for row in cached} >= sources:
                if crossarch.add_control(cached, config, dataset, seed, data(dataset), folder):
                    path.write_text(json.dumps(cached))
                rows += cached
                continue
            if restore:
                _restore_metamers(config, dataset, seed, data, folder)
            found = crossarch.predictions(config, dataset, seed, data(dataset), folder)
            if {row["source"] for row in found} == sources:  # complete
                path.write_text(json.dumps(found))
            rows += found
    return rows


def _restore_metamers(config: StudyConfig, dataset: str, seed: int, data: DataCache, folder: Path) -> None:
    """Re-create the saved metamers of finished source cells whose files are gone (they are not
    kept in version control, so a study resumed from a fresh clone lacks them): the cell is run
    again with the same seeds, which reproduces them up to floating-point summation order."""
    for cell in crossarch.source_cells(config, dataset, seed):
        if _finished(cell, folder) is not None and not (folder / "metamers" / f"{cell.key}.pt").is_file():
            run_cell(cell, config, data, folder)


__all__ = ["run_study", "run_config", "full_config", "quick_config"]
