"""Cross-architecture recognisability (SPEC §4): metamers made from model A at its output layer
are classified by model B. Node metamers are put back into the full graph (the target's
receptive field replaced by the metamer, the rest real: ``MetamerResult.to_full_graph``) before
B classifies the target, so B sees its own, possibly larger, receptive field."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from .. import models
from ..graph.layers import call_model
from .config import Cell, ModelSpec, StudyConfig


def source_cells(config: StudyConfig, dataset: str, seed: int) -> list[Cell]:
    """The output-layer cells (base grid, no mitigation, not excluded) whose metamers are judged."""
    specs = [ModelSpec(dataset, arch, "none", 2, 64, seed) for arch in config.architectures]
    cells = [Cell(spec, spec.output_layer()) for spec in specs]
    return [cell for cell in cells if not config.excludes(cell.key)]


def predictions(config: StudyConfig, dataset: str, seed: int, data, folder: Path) -> list[dict]:
    """For every (source A, judge B) pair with saved metamers: B's predicted classes on A's
    metamers and on the references, and the labels (lists over targets)."""
    sources = [c for c in source_cells(config, dataset, seed)
               if (folder / "metamers" / f"{c.key}.pt").is_file()]
    judges = {c.model.arch: models.load_checkpoint(folder / "models" / f"{c.model.key}.pt")
              for c in sources}
    rows = []
    for cell in sources:
        saved = torch.load(folder / "metamers" / f"{cell.key}.pt", weights_only=False)
        judge = _node_judgements if cell.model.task == "node" else _graph_judgements
        for name, model in judges.items():
            metamer, reference, labels = judge(model, saved, data)
            rows.append({"dataset": dataset, "source": cell.model.arch, "judge": name, "seed": seed,
                         "metamer": metamer,
                         "reference": reference, "labels": labels})
    return rows


@torch.no_grad()
def _node_judgements(model: nn.Module, saved: dict, graph: Data) -> tuple[list, list, list]:
    """B's classes of each target with its receptive field replaced by the metamer
    (``MetamerResult.to_full_graph``), of the unchanged graph, and the labels."""
    result, targets = saved["results"][0], torch.tensor(saved["targets"])
    reference = call_model(model, graph.x, graph.edge_index, getattr(graph, "edge_weight", None))
    classes = []
    for t, node in enumerate(targets.tolist()):
        full = result.to_full_graph(graph, target=t)
        out = call_model(model, full.x, full.edge_index, getattr(full, "edge_weight", None))
        classes.append(int(out[node].argmax()))
    return classes, reference.argmax(1)[targets].tolist(), graph.y[targets].tolist()


@torch.no_grad()
def _graph_judgements(model: nn.Module, saved: dict, graphs: list) -> tuple[list, list, list]:
    """B's classes of each metamer graph and of its reference graph, and the labels. A saved
    result holds one metamer graph or a batch of them (``graph.batch``)."""
    def predict(g: Data) -> list[int]:
        batch = getattr(g, "batch", None)
        out = call_model(model, g.x, g.edge_index, getattr(g, "edge_weight", None),
                         torch.zeros(g.num_nodes, dtype=torch.long) if batch is None else batch)
        return out.argmax(1).tolist()

    metamers = [c for r in saved["results"] for c in predict(r.graph)]
    references = [c for i in saved["targets"] for c in predict(graphs[i])]
    return metamers, references, [int(graphs[i].y.view(-1)[0]) for i in saved["targets"]]


def pooled(rows: list[dict], dataset: str) -> dict[tuple[str, str], tuple[Tensor, Tensor, Tensor]]:
    """``{(source, judge): (metamer, reference, labels)}`` over all seeds of ``dataset``, as
    :func:`fastmetamer.analysis.recognisability_matrix` takes it."""
    pairs: dict = {}
    for row in rows:
        if row["dataset"] != dataset:
            continue
        entry = pairs.setdefault((row["source"], row["judge"]), ([], [], []))
        for part, key in zip(entry, ("metamer", "reference", "labels")):
            part.extend(row[key])
    return {pair: tuple(torch.tensor(p) for p in parts) for pair, parts in pairs.items()}
