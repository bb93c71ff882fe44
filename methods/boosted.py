"""`boosted`: Boosted Dynamic Networks (Yu et al., AAAI 2023; SHI-Labs/Boosted-Dynamic-Networks).

Exit k is a weak learner trained on top of the frozen ensemble of the exits before it (f_k: raw logits):

    readout   F_k = f_k + gamma * F_{k-1},  F_0 = 0           (models/dynamic_net.py, `DynamicNet.forward`)
    training  L = sum_k CE(f_k + gamma * sg(F_{k-1}), y)      (train_cifar100.py `train`: `criterion(preds[stage]
                                                               + out, y)`, `out` the detached ensemble so far)

so exit k's training logits are exactly its readout output with the gradient stopped at F_{k-1}; the
readout's carry is detached. Defaults and where they come from:
- gamma = 0.5: every training script of the reference passes `--ensemble_reweight 0.5` (one weight for all
  exits; with one weight, the reference's training-time `(f_k + G_{k-1}) * r` recursion and its test-time
  `f_k + r * F_{k-1}` give the same logits, which is what we implement).
- ge = true: every MSDNet script trains `--arch msdnet_ge`, gradient equilibrium at the stage boundaries; the
  mechanism is methods/ge.py's. `ge_scope: coarsest` is msdnet_ge's own variant (only `x[-1]` rescaled); the
  default `all` (the paper's formula, as `ge`) also fits backbones whose state is not a list (RANet). The
  reference's RANet scripts use no equilibrium: `ge: false`.
- loss_equal = false: train_imagenet.py's `--loss_equal` flag (off in its scripts): loss_k / m_k * mean_j m_j,
  m_k an exponential moving average of loss_k's value (`MomentumMeter`, momentum 0.9, first value taken
  as is), updated with this batch's losses before they are weighted.
Several workers: as the reference's train_imagenet.py (DDP, `find_unused_parameters=True`): DDP averages the
gradients of a mean over samples; loss_equal's averages are each worker's own (`meter.update(loss.item())` of
the worker's loss), and checkpoints keep every worker's, so a resumed worker continues its own.
The trial's own defaults are the reference's optimiser (SGD lr 0.1, momentum 0.9, weight decay 1e-4, x0.1 at
50 % and 75 % of the epochs: `--lr_f 0.1 --lr_milestones 150,225 --epochs 300`). The readout costs C
multiply-adds at every exit after the first.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from bench.readout import Readout, readout_outputs
from bench.registry import METHODS, Params
from methods.base import Strategy, measure, per_exit_ce
from methods.ge import equilibrium


class BoostedParams(Params):
    gamma: float = Field(0.5, ge=0, description="weight of the previous exits' ensemble (reference: 0.5)")
    ge: bool = Field(True, description="gradient equilibrium at stage boundaries (reference: msdnet_ge)")
    ge_scope: Literal["all", "coarsest"] = Field("all", description="as method ge's scope")
    loss_equal: bool = Field(False, description="reference's --loss_equal: loss_k scaled by mean EMA / EMA_k")
    loss_equal_momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of loss_equal (reference 0.9)")


class BoostedReadout(Readout):
    """F_k = f_k + gamma * sg(F_{k-1}), F_0 = 0."""

    def __init__(self, num_exits: int, num_classes: int, gamma: float):
        super().__init__(num_exits, num_classes)
        self.gamma = gamma

    def exit(self, k, logits, carry):
        out = logits if carry is None else logits + self.gamma * carry.detach()
        return out, out

    def exit_macs(self):
        return [0] + [self.num_classes] * (self.num_exits - 1)


@METHODS.register("boosted", BoostedParams)
class Boosted(Strategy):
    """Boosting across exits: exit k learns the residual of the (frozen) weighted sum of the earlier exits."""

    distributed = True

    @classmethod
    def build_readout(cls, params, num_exits, num_classes):
        return BoostedReadout(num_exits, num_classes, params.gamma)

    def __init__(self, params: BoostedParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        if not isinstance(self.readout, BoostedReadout):
            raise TypeError("method boosted needs its readout: pass readout=build_readout(...)")
        self.loss_ema: list[float] | None = None  # loss_equal's moving averages, one per exit
        self.loss_ema_ranks: list | None = None  # from a checkpoint of several workers: every worker's

    def distribute(self, model, group):
        super().distribute(model, group)
        if self.loss_ema_ranks:  # this worker's own (rank 0's when the checkpoint had fewer workers)
            self.loss_ema = self.loss_ema_ranks[group.rank if group.rank < len(self.loss_ema_ranks) else 0]

    def boundary(self, k, state):
        return equilibrium(k, state, self.model.num_exits, self.params.ge_scope)

    def step(self, x, y, iteration):
        with self.autocast():
            logits = self.model(x, boundary=self.boundary if self.params.ge else None)
            outputs = readout_outputs(self.readout, logits)
            losses = per_exit_ce(outputs, y)
            exit_loss = losses.mean(0)
            if self.params.loss_equal:
                m = self.params.loss_equal_momentum
                values = exit_loss.detach().cpu().tolist()
                self.loss_ema = values if self.loss_ema is None else \
                    [e * m + v * (1 - m) for e, v in zip(self.loss_ema, values)]
                mean = sum(self.loss_ema) / len(self.loss_ema)
                ema = torch.tensor(self.loss_ema, dtype=exit_loss.dtype, device=exit_loss.device)
                objective = (exit_loss / ema * mean).sum()
            else:
                objective = exit_loss.sum()
        self.optimizer_step(objective)
        return measure(outputs, y, losses, objective)

    def state_dict(self):
        state = {**super().state_dict(), "loss_ema": self.loss_ema}
        if self.group is not None:
            state["loss_ema_ranks"] = self.group.gather(self.loss_ema)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.loss_ema, self.loss_ema_ranks = state.get("loss_ema"), state.get("loss_ema_ranks")
