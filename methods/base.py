"""The strategy interface: how a method turns one batch into optimiser step(s).

A strategy receives the model (the multi-exit contract only), the optimiser and its own parameters;
`step` performs the update(s) for one batch and returns what was measured. Extra networks,
optimisers and state belong to the strategy and travel through `state_dict` with the trial's checkpoint.
The engine owns the LR schedule (stepped once per `step` call) and the data.

A strategy may also own a readout (bench.readout): what exit k reports, from the raw logits of exits 1..k.
The class method `build_readout(params, num_exits, num_classes)` makes it from the method config alone; the
engine builds it, hands it over as `self.readout`, saves it with the checkpoint and evaluates through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from bench.backbones.contract import MultiExitNet
from bench.readout import Readout


@dataclass
class StepOutput:
    loss: float  # the objective that was minimised (count-weighted mean over the updates made in this step)
    exit_losses: torch.Tensor  # [K] unweighted mean cross-entropy per exit over the samples trained on
    exit_correct: torch.Tensor  # [K] correct top-1 predictions per exit
    count: int  # samples trained on
    extras: dict[str, float] = field(default_factory=dict)  # method-specific diagnostics (e.g. L2W's meta loss)


class Strategy:
    """Subclasses implement `step`. `total_steps` is the number of `step` calls in the whole run,
    `steps_per_epoch` the number in one epoch (`step`'s `iteration` is global: epoch * steps_per_epoch + i)."""

    # Several workers (workers.count > 1, bench/distributed.py): True when the strategy runs under DDP as its
    # reference runs on several GPUs (DDP; or nn.DataParallel or one device: one process's math on the global
    # batch), its own networks' gradients and batch statistics averaged through `self.group` where needed.
    # workers.count > 1 is refused for the others (a plug-in strategy must say it was made for DDP).
    distributed = False
    # Why workers.sync_bn (SyncBatchNorm) cannot be used with it; None: it can.
    sync_bn_refused: str | None = None

    def __init__(self, params: BaseModel, model: MultiExitNet, optimizer: torch.optim.Optimizer, *,
                 total_steps: int, steps_per_epoch: int | None = None, device: torch.device | str = "cpu",
                 amp: bool = False, readout: Readout | None = None):
        self.params = params
        self.model = model
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch or total_steps
        self.device = torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        # Without one (a strategy built outside the engine), the identity; strategies with their own
        # readout need it passed in (it needs the class count).
        self.readout = readout if readout is not None else Readout(model.num_exits, 0)
        self.group = None  # the DDP worker group (bench.trial.workers.Workers) once `distribute` is called

    @classmethod
    def build_readout(cls, params: BaseModel, num_exits: int, num_classes: int) -> Readout:
        """The readout this strategy trains and evaluates through (the identity unless overridden)."""
        return Readout(num_exits, num_classes)

    def autocast(self):
        return torch.autocast(self.device.type, enabled=self.amp)

    def step(self, x: torch.Tensor, y: torch.Tensor, iteration: int) -> StepOutput:
        raise NotImplementedError

    def distribute(self, model: torch.nn.Module, group) -> None:
        """Several workers: train through `model`, the DDP-wrapped network (still the multi-exit contract);
        `group` (bench.trial.workers.Workers) has the collectives a strategy with networks of its own needs.
        The readout's weights start as rank 0's (DDP does the same for the model's)."""
        self.model, self.group = model, group
        if next(self.readout.parameters(), None) is not None:
            group.broadcast(self.readout)

    def worker_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The workers' mean of each tensor (each tensor itself in one process): a statistic of the batch that
        one process would compute from the whole of it, from the workers' equal shares."""
        return tensors if self.group is None else self.group.average(tensors)

    def average_gradients(self, params) -> None:
        """Under DDP, the workers' mean of the gradients of `params`, networks outside the DDP wrapper (a
        readout's, a strategy's own), as DDP's reducer does for the model's; nothing in one process."""
        if self.group is None:
            return
        params = [p for p in params if p.grad is not None]
        if params:
            for p, g in zip(params, self.group.average([p.grad for p in params])):
                p.grad.copy_(g)

    def leaves_parameters_unused(self) -> bool:
        """Whether a step may give some trainable parameter no gradient (under DDP a graph walk per step
        then finds them, or DDP would wait for their gradients)."""
        return False

    def end_epoch(self, epoch: int, loader) -> None:
        """Called once after every epoch's steps (epoch 0-based, `loader` the training batches), before
        validation and the checkpoint: where epoch-level methods (Meta-GF's fusion pass) do their work."""

    def optimizer_step(self, loss: torch.Tensor, outside=()) -> None:
        """zero_grad, backward, step (through the AMP scaler when AMP is on). `outside`: parameters of the
        optimiser that the DDP wrapper does not hold (a readout's), their gradients averaged over the workers."""
        self.optimizer.zero_grad(set_to_none=True)
        if not loss.requires_grad:  # reaches nothing trainable (`last` on a frozen backbone): no update
            return
        self.scaler.scale(loss).backward()
        self.average_gradients(outside)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def per_exit_ce(logits: list[torch.Tensor], y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """[N, K] per-sample cross-entropy at every exit."""
    return torch.stack([F.cross_entropy(z, y, reduction="none", label_smoothing=label_smoothing)
                        for z in logits], dim=1)


def measure(logits: list[torch.Tensor], y: torch.Tensor, losses: torch.Tensor, objective: torch.Tensor) -> StepOutput:
    """StepOutput from one update: `losses` is the [N, K] unweighted CE matrix."""
    with torch.no_grad():
        correct = torch.stack([(z.argmax(1) == y).sum() for z in logits]).cpu()
        return StepOutput(float(objective.detach()), losses.detach().mean(0).cpu(), correct, int(y.numel()))


def combine(outputs: list[StepOutput]) -> StepOutput:
    """Several updates in one step (L2W's two halves): count-weighted objective and exit losses, summed
    correct counts. A mean, not a sum, keeps `loss` comparable with one-update strategies."""
    n = sum(o.count for o in outputs)
    keys = {k for o in outputs for k in o.extras}
    extras = {k: sum(o.extras[k] for o in outputs if k in o.extras) / sum(k in o.extras for o in outputs)
              for k in sorted(keys)}
    return StepOutput(
        sum(o.loss * o.count for o in outputs) / n,
        sum(o.exit_losses * o.count for o in outputs) / n,
        sum(o.exit_correct for o in outputs),
        n,
        extras,
    )
