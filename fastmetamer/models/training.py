"""Training for node and graph classification, with optional PGD adversarial training.

Node classification takes one PyG ``Data`` with ``x`` ``[N, F]``, ``edge_index``
``[2, E]``, optional ``edge_weight`` ``[E]``, ``y`` ``[N]`` and boolean
``train_mask``/``val_mask``/``test_mask`` ``[N]``. Graph classification takes a
list (or PyG ``Dataset``) of graphs, each with a graph label ``y``, and a model
with a pooling readout; the graphs are split 80/10/10 at random by ``seed``.

Adversarial training (Madry et al., 2018) perturbs the node features with
projected gradient descent inside an L-infinity ball (elementwise) or an L2
ball (per node: each row of the perturbation has norm at most ``eps``) and
minimises ``(1 - mix) * clean_loss + mix * adversarial_loss``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data, Dataset
from torch_geometric.loader import DataLoader
from tqdm.auto import tqdm

_NORMS = ("linf", "l2")
_SPLITS = ("train", "val", "test")


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        model: the trained model with its best-validation weights, in eval mode.
        train_acc: accuracy on the training split.
        val_acc: accuracy on the validation split.
        test_acc: accuracy on the test split.
        best_epoch: epoch (0-based) whose weights were kept.
        history: per-epoch lists ``train_loss``, ``val_loss``, ``val_acc``.
    """

    model: nn.Module
    train_acc: float
    val_acc: float
    test_acc: float
    best_epoch: int
    history: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class PGDConfig:
    """Projected-gradient attack on node features used for adversarial training.

    Attributes:
        eps: radius of the perturbation ball (> 0).
        norm: ``"linf"`` (elementwise bound) or ``"l2"`` (bound per node row).
        steps: number of PGD steps (>= 1).
        alpha: step size; default ``2.5 * eps / steps``.
        mix: weight of the adversarial loss in ``[0, 1]``.
    """

    eps: float
    norm: str = "linf"
    steps: int = 5
    alpha: float | None = None
    mix: float = 0.5

    def __post_init__(self) -> None:
        """Validate every field."""
        if self.norm not in _NORMS:
            raise ValueError(f"adversarial norm must be one of {_NORMS}, got {self.norm!r}")
        if not self.eps > 0:
            raise ValueError(f"adversarial eps must be > 0, got {self.eps}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"adversarial steps must be an int >= 1, got {self.steps!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"adversarial alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"adversarial mix must be in [0, 1], got {self.mix}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "PGDConfig":
        """Build from a dict such as ``dict(norm="l2", eps=0.5, steps=5, alpha=0.2, mix=0.5)``."""
        if not isinstance(options, dict):
            raise TypeError(f"adversarial must be a dict or None, got {type(options).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"unknown adversarial options {sorted(unknown)}; allowed: {sorted(allowed)}")
        if "eps" not in options:
            raise ValueError("adversarial options need 'eps'")
        return cls(**options)

    @property
    def step_size(self) -> float:
        """The PGD step size (``alpha`` or ``2.5 * eps / steps``)."""
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps


def _row_norm(t: Tensor) -> Tensor:
    """Per-row L2 norms ``[N, 1]`` of ``t`` ``[N, F]``, floored to avoid division by 0."""
    return t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _project(delta: Tensor, cfg: PGDConfig) -> Tensor:
    """Project ``delta`` ``[N, F]`` onto the ``cfg`` ball."""
    if cfg.norm == "linf":
        return delta.clamp(-cfg.eps, cfg.eps)
    return delta * (cfg.eps / _row_norm(delta)).clamp(max=1.0)


def _random_start(x: Tensor, cfg: PGDConfig, generator: torch.Generator) -> Tensor:
    """Random point ``[N, F]`` inside the ``cfg`` ball."""
    if cfg.norm == "linf":
        noise = torch.rand(x.shape, generator=generator) * 2 - 1
        return (cfg.eps * noise).to(x)
    direction = torch.randn(x.shape, generator=generator)
    radius = torch.rand(x.size(0), 1, generator=generator) * cfg.eps
    return (direction / _row_norm(direction) * radius).to(x)


def pgd_perturb(
    loss_fn: Callable[[Tensor], Tensor], x: Tensor, cfg: PGDConfig, generator: torch.Generator
) -> Tensor:
    """Return adversarial features ``x + delta`` ``[N, F]`` maximising ``loss_fn``.

    Args:
        loss_fn: maps features ``[N, F]`` to a scalar loss.
        x: clean features ``[N, F]``.
        cfg: attack settings.
        generator: CPU generator for the random start.
    """
    delta = _random_start(x, cfg, generator)
    for _ in range(cfg.steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x + delta), delta)
        step = grad.sign() if cfg.norm == "linf" else grad / _row_norm(grad)
        delta = _project(delta.detach() + cfg.step_size * step, cfg)
    return (x + delta).detach()


class _NodeTask:
    """Node classification on one graph with boolean split masks."""

    def __init__(self, data: Data, device: torch.device) -> None:
        if data.x is None or data.y is None or data.edge_index is None:
            raise ValueError("node classification needs data.x [N, F], data.edge_index [2, E] and data.y [N]")
        for split in _SPLITS:
            mask = getattr(data, f"{split}_mask", None)
            if mask is None:
                raise ValueError(f"node classification needs data.{split}_mask (boolean [num_nodes])")
            if mask.dtype != torch.bool or mask.shape != (data.num_nodes,):
                raise ValueError(f"data.{split}_mask must be a bool tensor of shape [{data.num_nodes}], "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            if not bool(mask.any()):
                raise ValueError(f"data.{split}_mask selects no nodes")
        self.data = copy.copy(data).to(device)  # shallow copy: never move the caller's tensors

    def batches(self, split: str, generator: torch.Generator | None = None) -> Iterator[tuple[Data, Tensor]]:
        """Yield the whole graph and the ``split`` mask ``[N]``."""
        yield self.data, getattr(self.data, f"{split}_mask")


class _GraphTask:
    """Graph classification over a list of graphs split 80/10/10."""

    def __init__(self, graphs: Sequence[Data], seed: int, batch_size: int, device: torch.device) -> None:
        if len(graphs) < 3:
            raise ValueError(f"graph classification needs at least 3 graphs, got {len(graphs)}")
        perm = torch.randperm(len(graphs), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = max(1, round(0.1 * len(graphs)))
        chosen = {"val": perm[:n_eval], "test": perm[n_eval:2 * n_eval], "train": perm[2 * n_eval:]}
        self.splits = {split: [graphs[i] for i in idx] for split, idx in chosen.items()}
        self.batch_size = batch_size
        self.device = device

    def batches(self, split: str, generator: torch.Generator | None = None) -> Iterator[tuple[Data, None]]:
        """Yield mini-batches of the ``split`` graphs (shuffled when ``generator`` is given)."""
        loader = DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=generator is not None,
                            generator=generator)
        for batch in loader:
            yield batch.to(self.device), None


def _logits(model: nn.Module, graph: Data, x: Tensor, mask: Tensor | None) -> Tensor:
    """Model logits for ``graph`` with features ``x``; rows selected by ``mask``."""
    edge_weight = getattr(graph, "edge_weight", None)
    batch = getattr(graph, "batch", None)
    if batch is None:
        out = model(x, graph.edge_index, edge_weight)
    else:
        out = model(x, graph.edge_index, edge_weight, batch=batch)
    return out if mask is None else out[mask]


def _labels(graph: Data, mask: Tensor | None) -> Tensor:
    """Labels ``[M]`` of the selected nodes, or of all graphs in the batch."""
    y = graph.y.view(-1) if mask is None else graph.y[mask]
    return y.long()


def _train_loss(model: nn.Module, graph: Data, mask: Tensor | None, pgd: PGDConfig | None,
                generator: torch.Generator) -> Tensor:
    """Clean cross-entropy, mixed with the PGD loss when ``pgd`` is set."""
    y = _labels(graph, mask)
    clean = F.cross_entropy(_logits(model, graph, graph.x, mask), y)
    if pgd is None:
        return clean
    model.eval()
    x_adv = pgd_perturb(lambda x: F.cross_entropy(_logits(model, graph, x, mask), y), graph.x, pgd, generator)
    model.train()
    adv = F.cross_entropy(_logits(model, graph, x_adv, mask), y)
    return (1 - pgd.mix) * clean + pgd.mix * adv


def _train_epoch(model: nn.Module, task: Any, optimizer: torch.optim.Optimizer, pgd: PGDConfig | None,
                 generator: torch.Generator) -> float:
    """One pass over the training split; returns the mean training loss."""
    losses = []
    for graph, mask in task.batches("train", generator):
        model.train()
        optimizer.zero_grad()
        loss = _train_loss(model, graph, mask, pgd, generator)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def _evaluate(model: nn.Module, task: Any, split: str) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) of ``model`` on ``split``."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for graph, mask in task.batches(split):
        logits, y = _logits(model, graph, graph.x, mask), _labels(graph, mask)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=-1) == y).sum())
        count += y.numel()
    return loss_sum / count, correct / count


def _is_pooled(model: nn.Module) -> bool:
    """True when ``model`` is configured with a pooling readout."""
    return getattr(model, "config", {}).get("pool") is not None


def _make_task(model: nn.Module, data: Any, seed: int, batch_size: int) -> Any:
    """Pick node or graph classification from ``data`` and check it fits ``model``."""
    device = next(model.parameters()).device
    if isinstance(data, Data):
        if _is_pooled(model):
            raise ValueError("model has a pooling readout (graph classification); pass a list of graphs")
        return _NodeTask(data, device)
    if isinstance(data, (list, tuple, Dataset)):
        if not _is_pooled(model):
            raise ValueError("graph classification needs a model built with pool='mean'|'add'|'max'")
        return _GraphTask(data, seed, batch_size, device)
    raise TypeError(f"data must be a torch_geometric Data, a list of Data or a Dataset, got {type(data).__name__}")


def _check_train_args(epochs: int, lr: float, patience: int, batch_size: int) -> None:
    """Raise ValueError for out-of-range training arguments."""
    for name, value in [("epochs", epochs), ("patience", patience), ("batch_size", batch_size)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")


def _improved(val_acc: float, val_loss: float, best: tuple[float, float]) -> bool:
    """Higher validation accuracy wins; ties go to lower validation loss."""
    return val_acc > best[0] or (val_acc == best[0] and val_loss < best[1])


def train(
    model: nn.Module,
    data: Data | Sequence[Data] | Dataset,
    *,
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    patience: int = 50,
    seed: int = 0,
    progress: bool = False,
    adversarial: dict[str, Any] | None = None,
    batch_size: int = 32,
) -> TrainResult:
    """Train ``model`` with Adam and early stopping on validation accuracy.

    Reseeds the global torch RNG with ``seed`` (dropout) and uses ``seed`` for
    the graph split, shuffling and PGD starts, so runs are reproducible.

    Args:
        model: a zoo model (or any module called as ``model(x, edge_index, edge_weight)``).
        data: a ``Data`` with split masks (node classification) or a list /
            ``Dataset`` of graphs (graph classification; model needs ``pool``).
        epochs: maximum number of epochs.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        patience: stop after this many epochs without validation improvement.
        seed: random seed.
        progress: show a progress bar.
        adversarial: None, or PGD options ``dict(norm="linf"|"l2", eps, steps=5,
            alpha=2.5*eps/steps, mix=0.5)`` (see :class:`PGDConfig`).
        batch_size: graphs per mini-batch (graph classification).

    Returns:
        A :class:`TrainResult`; the model holds its best-validation weights and is in eval mode.
    """
    _check_train_args(epochs, lr, patience, batch_size)
    pgd = PGDConfig.from_dict(adversarial) if adversarial is not None else None
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    task = _make_task(model, data, seed, batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_acc": []}
    best, best_state, best_epoch = (-1.0, math.inf), None, 0
    for epoch in tqdm(range(epochs), desc="train", disable=not progress):
        history["train_loss"].append(_train_epoch(model, task, optimizer, pgd, generator))
        val_loss, val_acc = _evaluate(model, task, "val")
        history["val_loss"].append(val_loss)
        history["val_acc"].append(val_acc)
        if _improved(val_acc, val_loss, best):
            best, best_state, best_epoch = (val_acc, val_loss), copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    accs = {split: _evaluate(model, task, split)[1] for split in _SPLITS}
    return TrainResult(model, accs["train"], accs["val"], accs["test"], best_epoch, history)
