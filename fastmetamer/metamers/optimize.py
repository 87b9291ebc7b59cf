"""Staged Adam over the metamer parameters (SPEC §2.3).

``steps`` are split into ``stages`` equal stages and the learning rate halves between stages,
as in the original metamer work. A problem (component) whose loss falls below ``tol`` is
frozen from then on, so independent problems batched together behave like separate calls; the
run stops when all are frozen. The per-step losses are kept.

No host synchronisation in the step loop on a GPU: the frozen/active flags, the restart counters
and the best states stay on the device, and the host reads them (whether every problem is frozen,
whether one stalled) only every ``sync_every`` steps (default :func:`default_sync_every`). Steps
run past the last freeze change nothing (frozen problems do not move) and are cut from the
history, so the result does not depend on ``sync_every``, except that a stalled problem restarts
at the next read instead of at once.
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


GPU_SYNC_EVERY = 16  # steps between host reads of the device flags on a GPU


def default_sync_every(device: torch.device) -> int:
    """Steps between host reads of the loop's flags: 1 on the CPU (a read costs nothing there, and
    restarts happen at once), :data:`GPU_SYNC_EVERY` elsewhere."""
    return 1 if device.type == "cpu" else GPU_SYNC_EVERY


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
        self.since = torch.zeros(pass_loss.shape, dtype=torch.long, device=pass_loss.device)

    def observe(self, step: int, losses: Tensor) -> None:
        """Note which problems improved at ``step`` (on the device, every step)."""
        improved = losses < 0.99 * self.best
        self.best = torch.where(improved, losses, self.best)
        self.since = torch.where(improved, step, self.since)

    def stalled(self, step: int, losses: Tensor, active: Tensor) -> Tensor:
        """[C] bool: the problems to restart now."""
        return active & (step - self.since >= self.patience) & (losses > self.pass_loss)

    def restart(self, param_sets: list, stalled: Tensor, step: int) -> None:
        """Draw new starts for the stalled problems."""
        for ps in param_sets:
            ps.restart(stalled)
        self.since = torch.where(stalled, step, self.since)
        self.best = torch.where(stalled, float("inf"), self.best)


class BestStates:
    """The best discrete state seen of every problem, over all steps.

    Each parameter set gives ``current_state()``: the input the model saw at the last forward
    (binary features: the hard 0/1 rows; continuous: the clipped rows; structure: the chosen
    pairs), a tensor whose rows belong to the components ``state_owner`` [rows]. After a step's
    losses [C] are known, :meth:`update` copies the rows of every component that improved. A
    parameter set with ``best_ones(best, rows)`` and ``dense_state(best)`` (binary features by
    their ones) keeps its best state in that compact form; :meth:`dense_states` expands it.
    """

    def __init__(self, param_sets: list, num_components: int, device: torch.device | str = "cpu"):
        self.param_sets = param_sets
        self.loss = torch.full((num_components,), float("inf"), device=device)
        self.states: list[Tensor | None] = [None] * len(param_sets)

    def update(self, losses: Tensor, read: bool = True) -> None:
        """Record the states just evaluated where ``losses`` [C] beat the best so far; ``read``:
        the host may look whether any did (else the copy runs on the device regardless)."""
        improved = (losses < self.loss) | (self.states[0] is None)
        if read and not bool(improved.any()):
            return
        self.loss = torch.where(improved, losses, self.loss)
        for i, ps in enumerate(self.param_sets):
            if hasattr(ps, "best_ones"):
                self.states[i] = ps.best_ones(self.states[i], improved[ps.state_owner])
            elif self.states[i] is None:
                self.states[i] = ps.current_state().clone()
            else:
                state = ps.current_state()
                rows = improved[ps.state_owner].view(-1, *([1] * (state.dim() - 1)))
                self.states[i] = torch.where(rows, state, self.states[i])

    def dense_states(self) -> list[Tensor]:
        """The best state of every parameter set as :meth:`current_state` gives it (dense)."""
        return [ps.dense_state(state) if hasattr(ps, "best_ones") else state
                for ps, state in zip(self.param_sets, self.states)]


def run_schedule(param_sets: list[Parameterisation], step_losses: Callable[[], tuple[Tensor, Tensor]],
                 schedule: Schedule, num_components: int, *, progress: bool | None = None,
                 after_step: Callable[[int, Tensor], bool] | None = None,
                 restarts: Restarts | None = None, stop_below: Tensor | None = None,
                 best: BestStates | None = None, sync_every: int | None = None) -> Tensor:
    """Optimise; returns the loss history [steps_run, C] (loss before each update).

    ``step_losses()`` returns (per-component L_act [C], extra penalty scalar) with autograd
    paths to the parameters. A parameter set with a ``fused_step(lr, active)`` method updates
    itself (fused kernels) instead of going through this module's Adam. ``after_step(step,
    active)`` may replace parameters (e.g. a block resample) and returns True when it did, which
    resets Adam. With ``restarts``, stalled problems start again from a new draw (their update is
    skipped on the restart step). A problem stops once its loss is below ``stop_below`` [C]
    (default: the schedule's ``tol``). ``best`` records the best state of every problem after
    each forward. The host reads the device flags every ``sync_every`` steps (see the module).
    """
    if sync_every is not None and (isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1):
        raise ValueError(f"sync_every must be an int >= 1 (or None), got {sync_every!r}")
    adam = Adam(schedule)
    stop = schedule.tol if stop_below is None else stop_below
    active, history = None, []
    bar = tqdm(range(schedule.steps), desc="metamer", disable=None if progress is None else not progress,
               leave=False)
    for step in bar:
        losses, penalty = step_losses()
        current = losses.detach()
        history.append(current.clone())
        every = sync_every or default_sync_every(current.device)
        read = (step + 1) % every == 0
        active = torch.ones_like(current, dtype=torch.bool) if active is None else active
        if best is not None:
            best.update(history[-1], read)
        active &= current >= stop
        if read and not bool(active.any()):
            break
        (torch.where(active, losses, torch.zeros_like(losses)).sum() + penalty).backward()
        stalled = _stalled(restarts, step, current, active, read)
        moving = active if stalled is None else active & ~stalled
        _update(param_sets, adam, schedule.lr_at(step), moving, restarts, stalled, step)
        if after_step is not None and after_step(step + 1, active):
            adam.reset()
        if read:
            bar.set_postfix(loss=f"{current.max().item():.2e}")
    bar.close()
    return _until_frozen(torch.stack(history), stop)


def _stalled(restarts: Restarts | None, step: int, losses: Tensor, active: Tensor, read: bool) -> Tensor | None:
    """[C] bool of the problems to restart at this step, or None when none does (read only when
    ``read``: between reads no problem restarts)."""
    if restarts is None:
        return None
    restarts.observe(step, losses)
    if not read:
        return None
    stalled = restarts.stalled(step, losses, active)
    return stalled if bool(stalled.any()) else None


def _update(param_sets: list, adam: Adam, lr: float, moving: Tensor, restarts: Restarts | None,
            stalled: Tensor | None, step: int) -> None:
    """One update of the problems ``moving`` [C], the restarts of ``stalled`` and the projections."""
    autograd_sets = [ps for ps in param_sets if not hasattr(ps, "fused_step")]
    params = [p for ps in autograd_sets for p in ps.params]
    owners = [o for ps in autograd_sets for o in ps.parameter_components()]
    for ps in param_sets:
        if hasattr(ps, "fused_step"):
            ps.fused_step(lr, moving)
    adam.step(params, owners, moving, lr)
    if stalled is not None:
        restarts.restart(param_sets, stalled, step)
        adam.reset_rows(owners, stalled)
    for ps in param_sets:
        project = getattr(ps, "project", None)
        if project is not None:
            project()


def _until_frozen(history: Tensor, stop: Tensor | float) -> Tensor:
    """``history`` [S, C] up to the first step at which every problem had fallen below ``stop``
    (the step the loop stops at when it reads the flags every step)."""
    frozen = (history < stop).cummax(0).values.all(1)
    if not bool(frozen.any()):
        return history
    return history[:int(frozen.int().argmax()) + 1]
