"""`kd-anneal`: distillation from the last exit with an annealed temperature (Phuong & Lampert, ICCV 2019,
"Distillation-based training for multi-exit architectures"; mary-phuong/multiexit-distillation `main.py`,
`DistillationBasedLoss`).

    L = s * [ (1 - c) * sum_k CE_k + c * T^2 * sum_{k<K} CE(softmax(z_K.detach() / T), log_softmax(z_k / T)) ]

The distillation term is the soft-target cross-entropy -mean_i sum_j p_teacher * log p_student, as the code
writes it. T starts at 1; after each step, if the teacher's mean max-probability at the T just used exceeds
`maxprob`, T is multiplied by `t_mult` (1.05). T is strategy state: checkpoints and resume keep it.
Defaults c = 0.5, maxprob = 0.5, t_mult = 1.05 and global_scale s = 1 are the loss class's; the CIFAR
script `train_cifar.py` sets s = 2 * 5 / K (pass `global_scale` to reproduce it).

Several workers, as the reference's multi-GPU runs (`train.py`: nn.DataParallel, one process whose loss sees the
whole gathered batch): the objective is a mean over samples (DDP's gradient average is exact) and the teacher's
mean max-probability that drives T is the workers' mean, so every worker anneals T at the same steps as one
process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from bench.registry import METHODS, Params
from methods.base import Strategy, measure, per_exit_ce


class KDAnnealParams(Params):
    c: float = Field(0.5, ge=0, le=1, description="weight C of the distillation term (1 - C: cross-entropy)")
    maxprob: float = Field(0.5, gt=0, lt=1, description="raise T while the teacher's mean max-probability exceeds this")
    t_mult: float = Field(1.05, ge=1, description="factor applied to T after a step that exceeds maxprob")
    global_scale: float = Field(1.0, gt=0, description="multiplies the whole objective (train_cifar.py: 2*5/K)")


def kd_anneal_loss(logits: list[torch.Tensor], losses: torch.Tensor, p: KDAnnealParams,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, teacher's mean max-probability at `temperature` (a 0-dim tensor)) from the exits' logits and
    [N, K] CEs."""
    T, c = temperature, p.c
    teacher = F.softmax(logits[-1].detach() / T, dim=1)
    objective = (1 - c) * losses.mean(0).sum()
    for z in logits[:-1]:
        soft_ce = -(teacher * F.log_softmax(z / T, dim=1)).sum(1).mean()
        objective = objective + c * T * T * soft_ce
    return objective * p.global_scale, teacher.max(1).values.mean().detach()


@METHODS.register("kd-anneal", KDAnnealParams)
class KDAnneal(Strategy):
    """Cross-entropy plus distillation from the detached last exit, temperature annealed up (Phuong & Lampert)."""

    distributed = True

    def __init__(self, params: KDAnnealParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        self.temperature = 1.0

    def step(self, x, y, iteration):
        with self.autocast():
            logits = self.model(x)
            losses = per_exit_ce(logits, y)
            objective, teacher_maxprob = kd_anneal_loss(logits, losses, self.params, self.temperature)
        self.optimizer_step(objective)
        teacher_maxprob = float(self.worker_mean([teacher_maxprob.double()])[0])
        out = measure(logits, y, losses, objective)
        out.extras = {"temperature": self.temperature, "teacher_maxprob": teacher_maxprob}
        if teacher_maxprob > self.params.maxprob:
            self.temperature *= self.params.t_mult
        return out

    def state_dict(self):
        return {**super().state_dict(), "temperature": self.temperature}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.temperature = float(state["temperature"])
