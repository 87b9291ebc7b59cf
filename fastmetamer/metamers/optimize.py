"""Staged Adam over the metamer parameters (SPEC §2.3).

``steps`` are split into ``stages`` equal stages and the learning rate halves between stages,
as in the original metamer work. A problem (component) whose loss falls below ``tol`` is
frozen from then on, so independent problems batched together behave like separate calls; the
run stops when all are frozen. The per-step losses are kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm


class Parameterisation(Protocol):
    params: list[Tensor]

    def parameter_components(self) -> list[Tensor]: ...


@dataclass
class Schedule:
    """Optimiser settings: total steps, stages, initial learning rate, tolerance, Adam betas."""

    steps: int
    stages: int
    lr: float
    tol: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step``: halved after each completed stage."""
        stage_len = max(1, -(-self.steps // self.stages))
        return self.lr * 0.5 ** (step // stage_len)


class Adam:
    """Adam whose update skips entries that belong to frozen components."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.state: dict[int, tuple[Tensor, Tensor, int]] = {}

    def reset(self) -> None:
        """Forget the moments (after parameters were replaced)."""
        self.state.clear()

    def step(self, params: list[Tensor], owners: list[Tensor], active: Tensor, lr: float) -> None:
        """One update of every parameter with a gradient; ``owners[i]`` gives the component of
        each row of ``params[i]`` and ``active`` [C] says which components still move."""
        b1, b2 = self.schedule.betas
        for i, (p, owner) in enumerate(zip(params, owners)):
            if p.grad is None:
                continue
            m, v, t = self.state.get(i, (torch.zeros_like(p), torch.zeros_like(p), 0))
            t += 1
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + self.schedule.eps)
            mask = active[owner].to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
            with torch.no_grad():
                p.sub_(lr * mask * update)
            p.grad = None
            self.state[i] = (m, v, t)


def run_schedule(param_sets: list[Parameterisation], step_losses: Callable[[], tuple[Tensor, Tensor]],
                 schedule: Schedule, num_components: int, *, progress: bool | None = None,
                 after_step: Callable[[int, Tensor], bool] | None = None) -> Tensor:
    """Optimise; returns the loss history [steps_run, C] (loss before each update).

    ``step_losses()`` returns (per-component L_act [C], extra penalty scalar) with autograd
    paths to the parameters. A parameter set with a ``fused_step(lr, active)`` method updates
    itself (fused kernels) instead of going through this module's Adam. ``after_step(step, active)`` may replace parameters (e.g. a block
    resample) and returns True when it did, which resets Adam.
    """
    adam = Adam(schedule)
    active = torch.ones(num_components, dtype=torch.bool)
    history = []
    bar = tqdm(range(schedule.steps), desc="metamer", disable=None if progress is None else not progress,
               leave=False)
    for step in bar:
        losses, penalty = step_losses()
        history.append(losses.detach().clone())
        active &= losses.detach() >= schedule.tol
        if not active.any():
            break
        (losses[active].sum() + penalty).backward()
        lr = schedule.lr_at(step)
        autograd_sets = [ps for ps in param_sets if not hasattr(ps, "fused_step")]
        for ps in param_sets:
            if hasattr(ps, "fused_step"):
                ps.fused_step(lr, active)
        params = [p for ps in autograd_sets for p in ps.params]
        owners = [o for ps in autograd_sets for o in ps.parameter_components()]
        adam.step(params, owners, active, lr)
        for ps in param_sets:
            project = getattr(ps, "project", None)
            if project is not None:
                project()
        if after_step is not None and after_step(step + 1, active):
            adam.reset()
        bar.set_postfix(loss=f"{losses.detach().max().item():.2e}")
    bar.close()
    return torch.stack(history)
