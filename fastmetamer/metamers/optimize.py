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
    """Restart a problem that stalls without passing the null criterion.

    A problem stalls when its loss has not improved by 1% for ``patience`` steps while it is still
    above ``pass_loss`` [C] (the L_act below which it would pass). Its parameters are drawn anew
    (each parameter set's ``restart``); the best state seen is kept by :class:`BestStates`.
    """

    def __init__(self, pass_loss: Tensor, patience: int):
        self.pass_loss, self.patience = pass_loss, patience
        self.best = torch.full_like(pass_loss, float("inf"))
        self.since = torch.zeros(pass_loss.shape, dtype=torch.long)

    def stalled(self, step: int, losses: Tensor, active: Tensor) -> Tensor:
        """[C] bool: the problems to restart now."""
        improved = losses < 0.99 * self.best
        self.best = torch.where(improved, losses, self.best)
        self.since[improved] = step
        return active & (step - self.since >= self.patience) & (losses > self.pass_loss)

    def restart(self, param_sets: list, stalled: Tensor, step: int) -> None:
        """Draw new starts for the stalled problems."""
        for ps in param_sets:
            ps.restart(stalled)
        self.since[stalled] = step
        self.best[stalled] = float("inf")


class BestStates:
    """The best discrete state seen of every problem, over all steps.

    Each parameter set gives ``current_state()``: the input the model saw at the last forward
    (binary features: the hard 0/1 rows; continuous: the clipped rows; structure: the chosen
    pairs), a tensor whose rows belong to the components ``state_owner`` [rows]. After a step's
    losses [C] are known, :meth:`update` copies the rows of every component that improved.
    """

    def __init__(self, param_sets: list, num_components: int):
        self.param_sets = param_sets
        self.loss = torch.full((num_components,), float("inf"))
        self.states: list[Tensor | None] = [None] * len(param_sets)

    def update(self, losses: Tensor) -> None:
        """Record the states just evaluated where ``losses`` [C] beat the best so far."""
        improved = (losses < self.loss) | (self.states[0] is None)
        if not bool(improved.any()):
            return
        self.loss = torch.where(improved, losses, self.loss)
        for i, ps in enumerate(self.param_sets):
            state = ps.current_state()
            if self.states[i] is None:
                self.states[i] = state.clone()
            else:
                rows = improved[ps.state_owner].view(-1, *([1] * (state.dim() - 1)))
                self.states[i] = torch.where(rows, state, self.states[i])


def run_schedule(param_sets: list[Parameterisation], step_losses: Callable[[], tuple[Tensor, Tensor]],
                 schedule: Schedule, num_components: int, *, progress: bool | None = None,
                 after_step: Callable[[int, Tensor], bool] | None = None,
                 restarts: Restarts | None = None, stop_below: Tensor | None = None,
                 best: BestStates | None = None) -> Tensor:
    """Optimise; returns the loss history [steps_run, C] (loss before each update).

    ``step_losses()`` returns (per-component L_act [C], extra penalty scalar) with autograd
    paths to the parameters. A parameter set with a ``fused_step(lr, active)`` method updates
    itself (fused kernels) instead of going through this module's Adam. ``after_step(step, active)`` may replace parameters (e.g. a block
    resample) and returns True when it did, which resets Adam. With ``restarts``, stalled
    problems start again from a new draw (their update is skipped on the restart step). A
    problem stops once its loss is below ``stop_below`` [C] (default: the schedule's ``tol``).
    ``best`` records the best state of every problem after each forward.
    """
    adam = Adam(schedule)
    active = torch.ones(num_components, dtype=torch.bool)
    history = []
    bar = tqdm(range(schedule.steps), desc="metamer", disable=None if progress is None else not progress,
               leave=False)
    for step in bar:
        losses, penalty = step_losses()
        history.append(losses.detach().clone())
        if best is not None:
            best.update(history[-1])
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
            restarts.restart(param_sets, stalled, step)
            adam.reset_rows(owners, stalled)
        for ps in param_sets:
            project = getattr(ps, "project", None)
            if project is not None:
                project()
        if after_step is not None and after_step(step + 1, active):
            adam.reset()
        bar.set_postfix(loss=f"{losses.detach().max().item():.2e}")
    bar.close()
    return torch.stack(history)
