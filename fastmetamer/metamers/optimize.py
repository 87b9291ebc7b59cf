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

    def reset_rows(self, owners: list[Tensor], components: Tensor) -> None:
        """Forget the moments of the rows owned by ``components`` [C] bool."""
        for i, owner in enumerate(owners):
            if i in self.state:
                m, v, _ = self.state[i]
                rows = components[owner]
                m[rows] = 0
                v[rows] = 0

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


class Restarts:
    """Restart a problem that stalls without passing the null criterion, keeping its best state.

    A problem stalls when its loss has not improved by 1% for ``patience`` steps while it is still
    above ``pass_loss`` [C] (the L_act below which it would pass). Its parameters are drawn anew
    (each parameter set's ``restart``); the best state seen at a restart is put back at the end
    if the final loss is worse.
    """

    def __init__(self, pass_loss: Tensor, patience: int):
        self.pass_loss, self.patience = pass_loss, patience
        self.best = torch.full_like(pass_loss, float("inf"))
        self.since = torch.zeros(pass_loss.shape, dtype=torch.long)
        self.saved: dict[int, tuple[float, list]] = {}
        self.count = torch.zeros(pass_loss.shape, dtype=torch.long)

    def stalled(self, step: int, losses: Tensor, active: Tensor) -> Tensor:
        """[C] bool: the problems to restart now."""
        improved = losses < 0.99 * self.best
        self.best = torch.where(improved, losses, self.best)
        self.since[improved] = step
        return active & (step - self.since >= self.patience) & (losses > self.pass_loss)

    def restart(self, param_sets: list, stalled: Tensor, losses: Tensor, step: int) -> None:
        """Save the stalled problems' states (when best so far) and draw new starts."""
        for c in stalled.nonzero().flatten().tolist():
            if c not in self.saved or losses[c] < self.saved[c][0]:
                self.saved[c] = (float(losses[c]), [ps.component_state(c) for ps in param_sets])
        for ps in param_sets:
            ps.restart(stalled)
        self.since[stalled] = step
        self.best[stalled] = float("inf")
        self.count += stalled.long()

    def keep_best(self, param_sets: list, final: Tensor) -> None:
        """Put back saved states that beat the final losses [C]."""
        for c, (loss, states) in self.saved.items():
            if loss < final[c]:
                for ps, state in zip(param_sets, states):
                    ps.load_component_state(c, state)


def run_schedule(param_sets: list[Parameterisation], step_losses: Callable[[], tuple[Tensor, Tensor]],
                 schedule: Schedule, num_components: int, *, progress: bool | None = None,
                 after_step: Callable[[int, Tensor], bool] | None = None,
                 restarts: Restarts | None = None, stop_below: Tensor | None = None) -> Tensor:
    """Optimise; returns the loss history [steps_run, C] (loss before each update).

    ``step_losses()`` returns (per-component L_act [C], extra penalty scalar) with autograd
    paths to the parameters. A parameter set with a ``fused_step(lr, active)`` method updates
    itself (fused kernels) instead of going through this module's Adam. ``after_step(step, active)`` may replace parameters (e.g. a block
    resample) and returns True when it did, which resets Adam. With ``restarts``, stalled
    problems start again from a new draw (their update is skipped on the restart step). A
    problem stops once its loss is below ``stop_below`` [C] (default: the schedule's ``tol``).
    """
    adam = Adam(schedule)
    active = torch.ones(num_components, dtype=torch.bool)
    history = []
    bar = tqdm(range(schedule.steps), desc="metamer", disable=None if progress is None else not progress,
               leave=False)
    for step in bar:
        losses, penalty = step_losses()
        history.append(losses.detach().clone())
        active &= losses.detach() >= (schedule.tol if stop_below is None else stop_below)
        if not active.any():
            break
        (losses[active].sum() + penalty).backward()
        lr = schedule.lr_at(step)
        autograd_sets = [ps for ps in param_sets if not hasattr(ps, "fused_step")]
        params = [p for ps in autograd_sets for p in ps.params]
        owners = [o for ps in autograd_sets for o in ps.parameter_components()]
        stalled = torch.zeros_like(active) if restarts is None else restarts.stalled(step, history[-1], active)
        for ps in param_sets:
            if hasattr(ps, "fused_step"):
                ps.fused_step(lr, active & ~stalled)
        adam.step(params, owners, active & ~stalled, lr)
        if stalled.any():
            restarts.restart(param_sets, stalled, history[-1], step)
            adam.reset_rows(owners, stalled)
        for ps in param_sets:
            project = getattr(ps, "project", None)
            if project is not None:
                project()
        if after_step is not None and after_step(step + 1, active):
            adam.reset()
        bar.set_postfix(loss=f"{losses.detach().max().item():.2e}")
    bar.close()
    if restarts is not None:
        restarts.keep_best(param_sets, history[-1])
    return torch.stack(history)
