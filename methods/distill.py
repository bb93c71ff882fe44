"""`distill`: one-for-all knowledge distillation (IMTA, Li et al. ICCV 2019, `KDLoss.loss_fn_kd`).

    L = CE_K + sum_{k<K} [ (1-gamma) * CE_k + gamma * T^2 * KL(p_teacher || softmax(z_k / T)) ]

The teacher is detached. `teacher: last` (default, as IMTA) uses p_teacher = softmax(z_K / T) for every
exit; `mean_later` uses, for exit k, the mean of softmax(z_j / T) over the later exits j = k+1..K (an
ensemble of everything deeper than k); `all_later` distils exit k from every later exit separately and sums,
gamma * T^2 * sum_{j>k} KL(softmax(z_j / T) || softmax(z_k / T)) (HDKD's dense distillation, without its
bi-level loss weights).

`kl_reduction: batchmean` (default) sums the KL over classes and averages over samples, the true KL.
`imta_mean` reproduces IMTA's `nn.KLDivLoss()` default ('mean' over samples x classes), which divides the
distillation term by the number of classes as well; a compatibility flag only.
Defaults T = 1, gamma = 0.1 are IMTA's run_IMTA.sh; its argparse defaults (T = 3, gamma = 0.9) are the
`distill-soft` preset.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from bench.registry import METHODS, Params
from methods.base import Strategy, measure, per_exit_ce


class DistillParams(Params):
    temperature: float = Field(1.0, gt=0, description="softmax temperature T")
    gamma: float = Field(0.1, ge=0, le=1, description="weight of the distillation term for exits 1..K-1")
    teacher: Literal["last", "mean_later", "all_later"] = "last"
    kl_reduction: Literal["batchmean", "imta_mean"] = Field(
        "batchmean", description="imta_mean: IMTA code's KLDivLoss() default, also divided by the class count")


def distill_loss(logits: list[torch.Tensor], losses: torch.Tensor, p: DistillParams) -> torch.Tensor:
    """The objective from the exits' logits and the [N, K] per-sample cross-entropies."""
    K, T, gamma = len(logits), p.temperature, p.gamma
    ce = losses.mean(0)
    objective = ce[-1]
    if K == 1:
        return objective
    with torch.no_grad():
        soft = [F.softmax(z.detach() / T, dim=1) for z in logits]
    # imta_mean: KLDivLoss()'s 'mean' over samples x classes, written out (torch plans to change 'mean').
    per_class = logits[0].shape[1] if p.kl_reduction == "imta_mean" else 1
    for k in range(K - 1):
        if p.teacher == "last":
            targets = [soft[-1]]
        elif p.teacher == "mean_later":
            targets = [torch.stack(soft[k + 1:]).mean(0)]
        else:
            targets = soft[k + 1:]
        student = F.log_softmax(logits[k] / T, dim=1)
        kl = sum(F.kl_div(student, t, reduction="batchmean") for t in targets) / per_class
        objective = objective + (1 - gamma) * ce[k] + gamma * T * T * kl
    return objective


@METHODS.register("distill", DistillParams)
class Distill(Strategy):
    """Cross-entropy at every exit plus distillation from the (detached) last exit into the earlier ones."""

    distributed = True  # a mean over samples: DDP's gradient average is the one-process gradient

    def step(self, x, y, iteration):
        with self.autocast():
            logits = self.model(x)
            losses = per_exit_ce(logits, y)
            objective = distill_loss(logits, losses, self.params)
        self.optimizer_step(objective)
        return measure(logits, y, losses, objective)


METHODS.add_preset("distill-soft", "distill", doc="IMTA argparse defaults: T = 3, gamma = 0.9",
                   temperature=3.0, gamma=0.9)
