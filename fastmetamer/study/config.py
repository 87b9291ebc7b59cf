"""What the invariance study runs: its settings (:class:`StudyConfig`) and the grid of cells.

A *cell* is one trained model (dataset x architecture x mitigation x depth x width x seed) at
one matched layer. The grid is the base grid (every architecture and every combination of the
mitigations at depth 2, width 64, all message-passing layers; the pooled ``readout`` for graph
classification) plus depth and width sweeps of the sweep architectures without mitigation.
"""
from __future__ import annotations

import fnmatch
import functools
import itertools
import re
from dataclasses import asdict, dataclass, field

import torch

from .. import models
from ..datasets import canonical_name

#: Mitigations against over-invariance; a cell's mitigation is "none" or a "+"-joined subset.
MITIGATIONS = ("elu", "residual", "adversarial")
ARCHITECTURES = ("gcn", "graphsage", "gin", "gat", "sgc", "appnp", "mlp")
GRAPH_DATASETS = ("synthetic_graphs", "MUTAG", "PROTEINS")
#: Architectures that ignore the edges (no structure metamers).
EDGELESS = ("mlp",)


def mitigation_names(parts=MITIGATIONS) -> list[str]:
    """"none" and every non-empty combination of ``parts``, e.g. "elu+adversarial"."""
    combos = [c for k in range(1, len(parts) + 1) for c in itertools.combinations(parts, k)]
    return ["none"] + ["+".join(c) for c in combos]


def check_mitigation(name: str) -> str:
    """Validate a mitigation name (``"none"`` or a ``"+"``-joined subset of :data:`MITIGATIONS`)."""
    parts = [] if name == "none" else name.split("+")
    if name != "none" and (not parts or len(set(parts)) != len(parts)
                           or any(p not in MITIGATIONS for p in parts)):
        raise ValueError(f"unknown mitigation {name!r}; use 'none' or a '+'-joined subset of "
                         f"{list(MITIGATIONS)} (e.g. 'elu+adversarial')")
    return name


@dataclass
class StudyConfig:
    """Settings of an invariance study (see :func:`quick_config` / :func:`full_config`).

    Attributes:
        datasets: dataset names (node classification: "synthetic", "Cora", ...; graph
            classification: "synthetic_graphs", "MUTAG", "PROTEINS").
        dataset_options: per dataset name, keyword arguments for ``fm.datasets.load``.
        architectures: zoo model names of the base grid.
        mitigations: mitigation names of the base grid (see :func:`mitigation_names`).
        depths, widths: sweep values (the base grid uses depth 2, width 64).
        sweep_architectures: architectures swept over depth and width (without mitigation).
        targets: target nodes (graphs) per cell, all solved in one batched ``generate`` call.
        steps: metamer optimisation steps.
        structure_targets, structure_steps: targets and steps of the structure-metamer cells
            (node tasks: every architecture that uses edges, output layer, no mitigation,
            depth 2, width 64); 0 targets leaves them out.
        seeds: number of training seeds (seed, seed + 1, ...).
        seed: base seed (training, targets, metamer initialisation).
        epochs: maximum training epochs (node, graph classification).
        adversarial: PGD options for adversarial training (``fm.models.train``).
        null_graphs: other real graphs in the graph-level pass criterion.
        root: data folder for the PyG datasets.
        progress: tqdm bars (None: only on a terminal).
        device: where datasets, models and metamers live ("cpu", "cuda", "cuda:1", ...).
        exclude: shell-style patterns of cell keys left out of the grid (e.g.
            ``"Cora-appnp-*-layers.2*"`` for cells too large for the machine); the report
            lists them.
    """

    datasets: tuple[str, ...]
    dataset_options: dict = field(default_factory=dict)
    architectures: tuple[str, ...] = ARCHITECTURES
    mitigations: tuple[str, ...] = tuple(mitigation_names())
    depths: tuple[int, ...] = (2, 3, 4)
    widths: tuple[int, ...] = (16, 64, 256)
    sweep_architectures: tuple[str, ...] = ("gcn", "graphsage")
    targets: int = 32
    steps: int = 1000
    structure_targets: int = 16
    structure_steps: int = 400
    seeds: int = 1
    seed: int = 0
    epochs: tuple[int, int] = (200, 100)
    adversarial: dict = field(default_factory=lambda: {"norm": "l2", "eps": 0.5, "steps": 3})
    null_graphs: int = 100
    root: str | None = None
    progress: bool | None = None
    exclude: tuple[str, ...] = ()
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.device = str(torch.device(self.device))
        self.datasets = tuple(canonical_name(d) for d in self.datasets)
        self.architectures = tuple(_check_arch(a) for a in self.architectures)
        self.sweep_architectures = tuple(_check_arch(a) for a in self.sweep_architectures)
        self.mitigations = tuple(check_mitigation(m) for m in self.mitigations)
        self.exclude = tuple(self.exclude)
        if not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"exclude must be non-empty cell-key patterns, got {self.exclude!r}")
        for name in ("targets", "steps", "seeds", "null_graphs", "structure_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.structure_targets, int) or self.structure_targets < 0:
            raise ValueError(f"structure_targets must be an int >= 0, got {self.structure_targets!r}")

    def excludes(self, key: str) -> bool:
        """True when the cell key ``key`` matches one of the :attr:`exclude` patterns."""
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.exclude)

    def to_dict(self) -> dict:
        """The settings as plain JSON-friendly values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _check_arch(name: str) -> str:
    key = name.lower()
    if key not in models.MODEL_NAMES:
        raise ValueError(f"unknown architecture {name!r}; allowed: {list(models.MODEL_NAMES)}")
    return key


def full_config(**overrides) -> StudyConfig:
    """The full study: synthetic, Cora, CiteSeer, MUTAG and PROTEINS, every architecture and
    mitigation combination, 32 targets, 1000 steps."""
    return StudyConfig(**{"datasets": ("synthetic", "Cora", "CiteSeer", "MUTAG", "PROTEINS"), **overrides})


def quick_config(**overrides) -> StudyConfig:
    """A CI-sized study (~1 minute on 2 cores): small synthetic node and graph datasets, three
    architectures, two mitigations, tiny sweeps, 8 targets, 100 steps."""
    settings = dict(
        datasets=("synthetic", "synthetic_graphs"),
        dataset_options={"synthetic": {"num_nodes": 300, "num_features": 100},
                         "synthetic_graphs": {"num_graphs": 60}},
        architectures=("gcn", "graphsage", "gat"), mitigations=("none", "elu+adversarial"),
        depths=(2, 3), widths=(16, 64), sweep_architectures=("gcn",), targets=8, steps=100,
        structure_targets=4, structure_steps=50,
        epochs=(50, 30), adversarial={"norm": "l2", "eps": 0.5, "steps": 2}, null_graphs=30)
    return StudyConfig(**{**settings, **overrides})


@dataclass(frozen=True)
class ModelSpec:
    """One trained model of the study."""

    dataset: str
    arch: str
    mitigation: str
    depth: int
    width: int
    seed: int

    @property
    def task(self) -> str:
        """"graph" for graph classification datasets, else "node"."""
        return "graph" if self.dataset in GRAPH_DATASETS or self.dataset.upper().startswith("TU:") else "node"

    @property
    def key(self) -> str:
        """A file-name-safe identifier."""
        name = f"{self.dataset}-{self.arch}-{self.mitigation}-d{self.depth}-w{self.width}-s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)

    def build_kwargs(self) -> dict:
        """Keyword arguments of ``fm.models.build_model`` (besides the sizes)."""
        kwargs = dict(hidden=self.width, depth=self.depth, residual="residual" in self.mitigation,
                      act="elu" if "elu" in self.mitigation else "relu",
                      pool="add" if self.task == "graph" else None)
        if self.arch == "sgc":  # one layer of K hops: depth sets K
            kwargs.update(depth=1, K=self.depth)
        return kwargs

    def layers(self) -> list[str]:
        """The matched layers: every message-passing layer (node tasks) or the pooled readout."""
        return list(_matched_layers(self))

    def output_layer(self) -> str:
        """The model's output layer: its last matched layer (logits, or the pooled readout)."""
        return _matched_layers(self)[-1]


@functools.lru_cache(maxsize=None)
def _matched_layers(spec: ModelSpec) -> tuple[str, ...]:
    """The matched layers of ``spec``, read once from a probe model of its shape."""
    if spec.task == "graph":
        return ("readout",)
    return tuple(models.build_model(spec.arch, 1, 1, **spec.build_kwargs()).metamer_layers)


@dataclass(frozen=True)
class Cell:
    """One model at one matched layer, with one kind of metamer ("features" or "structure")."""

    model: ModelSpec
    layer: str
    kind: str = "features"

    @property
    def key(self) -> str:
        suffix = "" if self.kind == "features" else f"-{self.kind}"
        return f"{self.model.key}-{self.layer}{suffix}"

    @property
    def is_output(self) -> bool:
        """True at the model's output layer (logits, or the pooled readout)."""
        return self.layer == self.model.output_layer()

    def to_dict(self) -> dict:
        return {**asdict(self.model), "task": self.model.task, "layer": self.layer, "kind": self.kind}


def model_specs(config: StudyConfig) -> list[ModelSpec]:
    """Every model of the study (base grid, then sweeps), without duplicates."""
    specs = []
    for dataset, seed in itertools.product(config.datasets, range(config.seed, config.seed + config.seeds)):
        base = [ModelSpec(dataset, a, m, 2, 64, seed)
                for a, m in itertools.product(config.architectures, config.mitigations)]
        sweeps = [ModelSpec(dataset, a, "none", d, w, seed) for a in config.sweep_architectures
                  for d, w in [(d, 64) for d in config.depths] + [(2, w) for w in config.widths]]
        specs += base + sweeps
    return list(dict.fromkeys(specs))


def cells(config: StudyConfig) -> list[Cell]:
    """Every cell of the study, in run order, dataset by dataset: the feature-metamer cells of
    every model and matched layer, then the structure-metamer cells (see :class:`StudyConfig`);
    cells matching ``config.exclude`` are left out."""
    specs = model_specs(config)
    order = []
    for dataset in dict.fromkeys(spec.dataset for spec in specs):
        mine = [spec for spec in specs if spec.dataset == dataset]
        order += [Cell(spec, layer) for spec in mine for layer in spec.layers()]
        order += [Cell(spec, spec.output_layer(), "structure") for spec in mine
                  if config.structure_targets and spec.task == "node" and spec.mitigation == "none"
                  and is_base(spec) and spec.arch not in EDGELESS]
    return [cell for cell in order if not config.excludes(cell.key)]


def is_base(spec: ModelSpec) -> bool:
    """True for the base-grid shape (depth 2, width 64)."""
    return spec.depth == 2 and spec.width == 64


__all__ = ["ARCHITECTURES", "MITIGATIONS", "GRAPH_DATASETS", "StudyConfig", "ModelSpec", "Cell",
           "mitigation_names", "check_mitigation", "full_config", "quick_config", "cells",
           "model_specs", "is_base"]
