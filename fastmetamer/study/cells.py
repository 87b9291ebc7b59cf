"""Running one cell of the study: train (or reload) the model, generate the targets' metamers in
one batched call, measure their metamer dimension, and keep per-target records.

Files under the study folder: ``models/<model>.pt`` (checkpoint) and ``.json`` (accuracies; for
adversarially trained models also ``robust_test_acc``, the test accuracy under a PGD attack in
the training ball, and its ``attack`` settings),
``metamers/<cell>.pt`` (the :class:`~fastmetamer.MetamerResult` objects of output-layer cells of
the base grid without mitigation, for the cross-architecture matrix and the drawings).
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data

from .. import datasets, models
from ..analysis.dimension import metamer_dimension
from ..metamers.generator import generate
from .config import Cell, ModelSpec, StudyConfig, is_base

_METRIC_PATHS = {"act_cosine": ("activation", "cosine"), "snr_db": ("activation", "snr_db"),
                 "feature_cosine": ("features", "cosine"), "relative_l2": ("features", "relative_l2"),
                 "marginal_w1": ("features", "marginal_w1"), "s_match": ("consistency", "s_match"),
                 "s_in": ("consistency", "s_in"), "consistency": ("consistency", "consistency"),
                 "edge_jaccard": ("structure", "edge_jaccard"), "wl_similarity": ("structure", "wl")}
#: Per-target records of a cell (lists of floats, one entry per target): from the metamer
#: results (``trivial``: 1.0 when the metamer came back identical to its reference over R, which
#: never passes; ``consistency`` is NaN unless the target passed and is not trivial), the
#: relevant-metamer flag, and from the metamer dimension.
RESULT_RECORDS = ("loss", "passed", "trivial", "distance", "null_threshold", *_METRIC_PATHS)
RECORDS = (*RESULT_RECORDS, "relevant", "dimension", "input_dim", "dimension_ratio", "rank_deficit",
           "log_volume")
HISTORY_POINTS = 100


class DataCache:
    """Datasets of the study, loaded once (a ``Data`` for node tasks, a list for graph tasks)."""

    def __init__(self, config: StudyConfig):
        self.config, self.loaded = config, {}

    def __call__(self, name: str):
        if name not in self.loaded:
            data = datasets.load(name, root=self.config.root, **self.config.dataset_options.get(name, {}))
            device = self.config.device
            self.loaded[name] = data.to(device) if isinstance(data, Data) else [g.to(device) for g in data]
        return self.loaded[name]


def num_classes(data) -> int:
    """Number of classes of a node dataset (``Data``) or a list of labelled graphs."""
    labels = data.y if isinstance(data, Data) else torch.cat([g.y.view(-1) for g in data])
    return int(labels.max()) + 1


def load_or_train(spec: ModelSpec, data, config: StudyConfig, folder: Path) -> tuple[nn.Module, dict]:
    """The trained model of ``spec`` and its accuracies; trained (seeded) and saved under
    ``folder/models`` the first time, reloaded afterwards."""
    path = folder / "models" / f"{spec.key}.pt"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        return models.load_checkpoint(path, config.device), json.loads(meta.read_text())
    features = data.num_features if isinstance(data, Data) else data[0].num_features
    torch.manual_seed(spec.seed)
    model = models.build_model(spec.arch, features, num_classes(data), **spec.build_kwargs()).to(config.device)
    started = time.perf_counter()
    result = models.train(model, data, epochs=config.epochs[spec.task == "graph"], seed=spec.seed,
                          adversarial=config.adversarial if "adversarial" in spec.mitigation else None)
    info = {"train_acc": result.train_acc, "val_acc": result.val_acc, "test_acc": result.test_acc,
            "best_epoch": result.best_epoch, "seconds": time.perf_counter() - started}
    if "adversarial" in spec.mitigation:
        info.update(robust_test_acc=robust_accuracy(result.model, data, config.adversarial, spec.seed),
                    attack={**config.adversarial, "steps": ROBUST_PGD_STEPS})
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(path) as partial:
        models.save_checkpoint(result.model, partial)
    write_atomically(meta, json.dumps(info))
    return result.model, info


#: PGD steps of the robust-accuracy attack (stronger than the few steps used in training).
ROBUST_PGD_STEPS = 20


def robust_accuracy(model: nn.Module, data, adversarial: dict, seed: int, steps: int = ROBUST_PGD_STEPS) -> float:
    """Test accuracy of ``model`` under a PGD attack on the node features (the ball of the
    adversarial training settings ``adversarial``: norm and eps; ``steps`` steps, random start
    seeded with ``seed``): the test nodes of a ``Data``, or the test split of a graph list (the
    same seeded split as training)."""
    from ..models.training import PGDConfig, _labels, _logits, _make_task, pgd_perturb

    options = {k: v for k, v in adversarial.items() if k not in ("steps", "alpha")}
    attack = PGDConfig.from_dict({**options, "steps": steps})
    task = _make_task(model, data, seed, 32)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    correct = count = 0
    for graph, mask in task.batches("test"):
        y = _labels(graph, mask)
        x_adv = pgd_perturb(lambda x: nn.functional.cross_entropy(_logits(model, graph, x, mask), y),
                            graph.x, attack, generator)
        with torch.no_grad():
            correct += int((_logits(model, graph, x_adv, mask).argmax(-1) == y).sum())
        count += y.numel()
    return correct / max(count, 1)


def node_targets(graph: Data, count: int, seed: int) -> Tensor:
    """``count`` test nodes [T] drawn with ``seed`` (all of them if fewer)."""
    pool = graph.test_mask.nonzero().flatten() if hasattr(graph, "test_mask") else \
        torch.arange(graph.num_nodes, device=graph.x.device)
    order = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed)).to(pool.device)
    return pool[order[:count]].sort().values


def graph_targets(graphs: list, count: int, nulls: int, seed: int) -> tuple[list[int], list[int]]:
    """(target graph ids, null graph ids) drawn with ``seed``, disjoint."""
    order = torch.randperm(len(graphs), generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:count], order[count:count + nulls]


@contextmanager
def _atomic(path: Path):
    """A temporary path next to ``path`` to write to; moved onto ``path`` in one step when the
    block ends without error, so that a reader (another rank of a shared study) never sees a
    partly written file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_atomically(path: Path, text: str) -> None:
    """``path.write_text(text)`` in one step for readers (see :func:`_atomic`)."""
    with _atomic(Path(path)) as partial:
        partial.write_text(text)


def run_cell(cell: Cell, config: StudyConfig, data_cache: DataCache, folder: Path) -> dict:
    """Run one cell and return its JSON-friendly record (``status`` "ok")."""
    spec = cell.model
    data = data_cache(spec.dataset)
    model, accuracy = load_or_train(spec, data, config, folder)
    run = _node_cell if spec.task == "node" else _graph_cell
    results, targets, dimension = run(cell, model, data, config)
    if cell.is_output and spec.mitigation == "none" and is_base(spec):
        (folder / "metamers").mkdir(parents=True, exist_ok=True)
        with _atomic(folder / "metamers" / f"{cell.key}.pt") as partial:
            torch.save({"targets": targets, "results": results}, partial)
    return {"key": cell.key, "cell": cell.to_dict(), "model": accuracy, "status": "ok",
            "targets": targets, **_records(results, dimension)}


def _node_cell(cell: Cell, model: nn.Module, graph: Data, config: StudyConfig):
    """All targets' metamers of the cell's kind in one batched call, and their metamer
    dimension (w.r.t. the receptive field's features, or its edges for structure metamers)."""
    structure = cell.kind == "structure"
    count, steps = (config.structure_targets, config.structure_steps) if structure else (config.targets, config.steps)
    targets = node_targets(graph, count, cell.model.seed)
    result = generate(model, graph, targets.tolist(), layer=cell.layer, kind=cell.kind, steps=steps,
                      seed=cell.model.seed, progress=False)
    started = time.perf_counter()
    dimension = metamer_dimension(model, graph, targets, layer=cell.layer, wrt="edges" if structure else "features")
    return [result], targets.tolist(), (dimension, time.perf_counter() - started)


def _graph_cell(cell: Cell, model: nn.Module, graphs: list, config: StudyConfig):
    """Graph-level metamers of the pooled readout for all target graphs in one batched call
    (null set: other real graphs), and the metamer dimension of every target graph at once."""
    targets, nulls = graph_targets(graphs, config.targets, config.null_graphs, cell.model.seed)
    batch = Batch.from_data_list([Data(x=graphs[i].x, edge_index=graphs[i].edge_index) for i in targets])
    result = generate(model, batch, None, layer=cell.layer, steps=config.steps, seed=cell.model.seed,
                      progress=False, null_graphs=[graphs[i] for i in nulls])
    started = time.perf_counter()
    dimension = metamer_dimension(model, batch, layer=cell.layer)
    return [result], targets, (dimension, time.perf_counter() - started)


def _records(results: list, dimension) -> dict:
    """Per-target records (:data:`RECORDS`), loss histories and timings of a cell."""
    dim, dim_seconds = dimension
    per_target = {key: torch.cat([_column(r, key) for r in results]) for key in RESULT_RECORDS}
    per_target["relevant"] = ((per_target["s_match"] >= 0.99) & (per_target["s_in"] <= 0.5)).double()
    per_target.update(dimension=dim.dimension.double(), input_dim=dim.input_dim.double(),
                      dimension_ratio=dim.dimension / dim.input_dim.clamp_min(1),
                      rank_deficit=dim.rank_deficit.double(), log_volume=dim.log_volume)
    history = _histories(results)
    steps = torch.linspace(0, history.shape[0] - 1, min(HISTORY_POINTS, history.shape[0]),
                           device=history.device).round().long().unique()
    return {"per_target": {key: per_target[key].tolist() for key in RECORDS},
            "history": {"steps": steps.tolist(), "loss": history[steps].tolist()},
            "seconds": {"generate": sum(r.seconds for r in results), "dimension": dim_seconds}}


def _histories(results: list) -> Tensor:
    """Loss histories of all targets [steps, T]; a target that stopped early keeps its last loss."""
    columns = [r.history.reshape(r.history.shape[0], -1) for r in results]
    longest = max(c.shape[0] for c in columns)
    return torch.cat([torch.cat([c, c[-1:].expand(longest - c.shape[0], -1)]) for c in columns], dim=1)


def _column(result, key: str) -> Tensor:
    """One per-target quantity of a :class:`~fastmetamer.MetamerResult` as float64 [T]."""
    if key in _METRIC_PATHS:
        group, name = _METRIC_PATHS[key]
        value = result.metrics[group][name]
    else:
        value = getattr(result, key)
    return torch.as_tensor(value, dtype=torch.float64).reshape(-1)
