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

    # Several workers (workers.count > 1, bench/distributed.py): True when DDP's average of the workers'
    # gradients on equal shares of the batch is this strategy's one-process update (an objective that is a
    # mean over samples; no state, network or statistic of its own that a rank would compute from its share).
    # workers.count > 1 is refused for the others.
    distributed = False
    sync_bn = True  # whether workers.sync_bn (SyncBatchNorm) may be used with it

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
        `group` (bench.distributed.Workers) has the collectives a strategy with networks of its own needs."""
        self.model = model

    def leaves_parameters_unused(self) -> bool:
        """Whether a step may give some trainable parameter no gradient (under DDP a graph walk per step
        then finds them, or DDP would wait for their gradients)."""
        return False

    def end_epoch(self, epoch: int, loader) -> None:
        """Called once after every epoch's steps (epoch 0-based, `loader` the training batches), before
        validation and the checkpoint: where epoch-level methods (Meta-GF's fusion pass) do their work."""

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """zero_grad, backward, step (through the AMP scaler when AMP is on)."""
        self.optimizer.zero_grad(set_to_none=True)
        if not loss.requires_grad:  # reaches nothing trainable (`last` on a frozen backbone): no update
            return
        self.scaler.scale(loss).backward()
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
