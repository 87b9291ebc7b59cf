"""Cross-architecture recognisability (SPEC §4): metamers made from model A at its output layer
are classified by model B. Node metamers are put back into the full graph (the target's
receptive field replaced by the metamer, the rest real: ``MetamerResult.to_full_graph``) before
B classifies the target, so B sees its own, possibly larger, receptive field.

Control (a floor for recognisability): B also classifies the reference targets with their
features shuffled across nodes (a seeded permutation of the rows of X over the whole graph, or
over all nodes of the dataset's graphs for graph tasks; edges kept). A metamer that B recognises
no better than this carries no more of the reference than its graph structure and the feature
distribution do."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from .. import models
from ..graph.layers import call_model
from .cells import load_or_train
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
    judges = {c.model.arch: models.load_checkpoint(folder / "models" / f"{c.model.key}.pt", config.device)
              for c in sources}
    rows = []
    for cell in sources:
        saved = torch.load(folder / "metamers" / f"{cell.key}.pt", weights_only=False)
        judge = _node_judgements if cell.model.task == "node" else _graph_judgements
        for name, model in judges.items():
            metamer, reference, labels = judge(model, saved, data)
            rows.append({"dataset": dataset, "source": cell.model.arch, "judge": name, "seed": seed,
                         "metamer": metamer, "reference": reference, "labels": labels,
                         "shuffled": shuffled_classes(model, saved["targets"], data, seed)})
    return rows


def add_control(rows: list[dict], config: StudyConfig, dataset: str, seed: int, data, folder: Path) -> bool:
    """Give cached prediction rows of ``dataset``/``seed`` written before the shuffled-features
    control existed their ``shuffled`` classes (in place). The control needs only the source
    cell's targets (from its cell record) and the judge (re-trained from its seed when its
    checkpoint is gone, as a resumed study does), not the saved metamers. Returns True when a
    row changed."""
    missing = [row for row in rows if "shuffled" not in row]
    if not missing:
        return False
    cells = {c.model.arch: c for c in source_cells(config, dataset, seed)}
    judges = {row["judge"]: load_or_train(cells[row["judge"]].model, data, config, folder)[0] for row in missing}
    for row in missing:
        record = json.loads((folder / "cells" / f"{cells[row['source']].key}.json").read_text())
        row["shuffled"] = shuffled_classes(judges[row["judge"]], record["targets"], data, seed)
    return True


def shuffled_features(x: Tensor, seed: int) -> Tensor:
    """The rows of ``x`` [N, F] in a permutation drawn with ``seed``."""
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)).to(x.device)]


def shuffled_classes(model: nn.Module, targets: list[int], data, seed: int) -> list[int]:
    """The control: B's classes of the reference ``targets`` (node ids of the graph ``data``, or
    indices into the graph list ``data``) with node features shuffled across nodes (``seed``)."""
    control = _shuffled_node_classes if isinstance(data, Data) else _shuffled_graph_classes
    return control(model, targets, data, seed)


@torch.no_grad()
def _shuffled_node_classes(model: nn.Module, targets: list[int], graph: Data, seed: int) -> list[int]:
    """B's classes of the targets on the real graph with its features shuffled across nodes."""
    out = call_model(model, shuffled_features(graph.x, seed), graph.edge_index, getattr(graph, "edge_weight", None))
    return out.argmax(1)[torch.tensor(targets, device=out.device)].tolist()


@torch.no_grad()
def _shuffled_graph_classes(model: nn.Module, targets: list[int], graphs: list, seed: int) -> list[int]:
    """B's classes of the target graphs with node features drawn by a permutation of all nodes
    of the dataset's graphs (each target keeps its edges and its number of nodes)."""
    pool = shuffled_features(torch.cat([g.x for g in graphs]), seed)
    classes, start = [], 0
    for i in targets:
        g = graphs[i]
        x = pool[start:start + g.num_nodes]
        start += g.num_nodes
        out = call_model(model, x, g.edge_index, getattr(g, "edge_weight", None),
                         torch.zeros(g.num_nodes, dtype=torch.long, device=x.device))
        classes.append(int(out.argmax(1)[0]))
    return classes


@torch.no_grad()
def _node_judgements(model: nn.Module, saved: dict, graph: Data) -> tuple[list, list, list]:
    """B's classes of each target with its receptive field replaced by the metamer
    (``MetamerResult.to_full_graph``), of the unchanged graph, and the labels."""
    result, targets = saved["results"][0], torch.tensor(saved["targets"], device=graph.x.device)
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
                         torch.zeros(g.num_nodes, dtype=torch.long, device=g.x.device) if batch is None else batch)
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


def pooled_control(rows: list[dict], dataset: str) -> dict[tuple[str, str], tuple[Tensor, Tensor]]:
    """``{(source, judge): (shuffled-feature classes, labels)}`` over the seeds of ``dataset``
    whose rows carry the control (rows cached before it existed lack it: such a pair is left
    out when none of its rows has it)."""
    pairs: dict = {}
    for row in rows:
        if row["dataset"] == dataset and "shuffled" in row:
            entry = pairs.setdefault((row["source"], row["judge"]), ([], []))
            entry[0].extend(row["shuffled"])
            entry[1].extend(row["labels"])
    return {pair: (torch.tensor(a), torch.tensor(b)) for pair, (a, b) in pairs.items()}
