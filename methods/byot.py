"""`byot`: Be Your Own Teacher self-distillation (Zhang et al., ICCV 2019; code: luanyunteng/pytorch-be-your-own-teacher
`train.py`, unofficial, the one the paper's authors point to).

    L = (1 - alpha) * sum_k CE_k
        + alpha * T^2 * sum_{k<K} CE(softmax(z_K.detach() / T), log_softmax(z_k / T))
        + beta * sum_{k<K} || (P_k f_k - f_K.detach()) * m_k ||^2

The distillation term is the reference's soft-target cross-entropy (`kd_loss_function`: -mean_i sum_j p_K
log p_k), which equals KL(p_K || p_k) plus the detached teacher's entropy: the same gradients. The hint
(`feature_loss_function`) is summed over samples and features, not averaged (hence beta = 1e-6), and masked to
the entries where either side is positive (m_k = [P_k f_k > 0 or f_K > 0]). f_k is exit k's embedding (the
vector its final linear layer reads; the multi-exit contract's `head_embedded`). The reference's exits all
read the last exit's width (its heads end in bottlenecks to 512 * expansion); here P_k is a linear
projection to the last exit's width owned by this strategy (identity when the widths already agree),
trained by the hint with its own SGD at the model's learning rate. Defaults T = 3, alpha = 0.1, beta = 1e-6
are the reference's argparse defaults. `beta: 0` drops the hint and works on any backbone.

Several workers, as the reference's multi-GPU runs (`train.py`: nn.DataParallel, one process whose loss sees the
whole gathered batch): CE and distillation are means over samples, which DDP's gradient average keeps; the hint
is a sum over samples, so each worker weights its share's hint by the number of workers (their mean is then the
global batch's sum). The projections start as rank 0's and their gradients are the workers' mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bench.errors import ConfigError
from bench.registry import METHODS, Params
from methods.base import Strategy, measure, per_exit_ce


class BYOTParams(Params):
    temperature: float = Field(3.0, gt=0, description="softmax temperature T")
    alpha: float = Field(0.1, ge=0, le=1, description="weight of the distillation term (1 - alpha: cross-entropy)")
    beta: float = Field(1e-6, ge=0, description="weight of the feature hint (0: no hint, any backbone)")


def byot_loss(logits: list[torch.Tensor], losses: torch.Tensor, p: BYOTParams,
              projected: list[torch.Tensor] | None = None, last_embedding: torch.Tensor | None = None,
              hint_scale: float = 1.0) -> torch.Tensor:
    """The objective from the exits' logits, [N, K] CEs and (for beta > 0) the projected embeddings of exits
    1..K-1 and the last exit's embedding; the hint (a sum over samples) times `hint_scale`."""
    T, a = p.temperature, p.alpha
    teacher = F.softmax(logits[-1].detach() / T, dim=1)
    objective = (1 - a) * losses.mean(0).sum()
    for z in logits[:-1]:
        objective = objective + a * T * T * -(teacher * F.log_softmax(z / T, dim=1)).sum(1).mean()
    if p.beta > 0:
        target = last_embedding.detach()
        for f in projected:
            mask = ((f > 0) | (target > 0)).to(f.dtype)
            objective = objective + hint_scale * p.beta * ((f - target) ** 2 * mask).sum()
    return objective


@METHODS.register("byot", BYOTParams)
class BYOT(Strategy):
    """Cross-entropy, distillation from the last exit and feature hints to its embedding (Be Your Own Teacher)."""

    distributed = True

    def __init__(self, params: BYOTParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        if params.beta > 0 and not model.has_embeddings:
            raise ConfigError(f"method.beta: the feature hint needs per-exit embeddings, which this "
                              f"{type(model).__name__} backbone does not expose; set method.beta=0")
        self.projections: nn.ModuleList | None = None  # built at the first step, when the widths are known
        self.projection_optimizer: torch.optim.Optimizer | None = None

    def _build_projections(self, widths: list[int]) -> None:
        self.widths, last = list(widths), widths[-1]
        self.projections = nn.ModuleList(nn.Identity() if w == last else nn.Linear(w, last, bias=False)
                                         for w in widths[:-1])
        self.projections.to(device=self.device, dtype=next(self.model.parameters()).dtype)
        if self.group is not None:
            self.group.broadcast(self.projections)
        group = self.optimizer.param_groups[0]
        params = list(self.projections.parameters())
        if params:
            self.projection_optimizer = torch.optim.SGD(
                params, lr=group["lr"], momentum=group.get("momentum", 0.0),
                weight_decay=group.get("weight_decay", 0.0), nesterov=group.get("nesterov", False))

    def step(self, x, y, iteration):
        beta = self.params.beta > 0
        with self.autocast():
            if beta:
                logits, embeddings = self.model(x, embeddings=True)
                if self.projections is None:
                    self._build_projections([e.shape[1] for e in embeddings])
                projected = [proj(e) for proj, e in zip(self.projections, embeddings[:-1])]
                losses = per_exit_ce(logits, y)
                objective = byot_loss(logits, losses, self.params, projected, embeddings[-1],
                                      hint_scale=1 if self.group is None else self.group.size)
            else:
                logits = self.model(x)
                losses = per_exit_ce(logits, y)
                objective = byot_loss(logits, losses, self.params)
        if self.projection_optimizer is None:
            self.optimizer_step(objective)
        else:  # one backward, both optimisers stepped through the one scaler
            for group in self.projection_optimizer.param_groups:  # follow the model's LR schedule
                group["lr"] = self.optimizer.param_groups[0]["lr"]
            self.optimizer.zero_grad(set_to_none=True)
            self.projection_optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(objective).backward()
            self.average_gradients(self.projections.parameters())
            self.scaler.step(self.optimizer)
            self.scaler.step(self.projection_optimizer)
            self.scaler.update()
        return measure(logits, y, losses, objective)

    def state_dict(self):
        state = super().state_dict()
        if self.projections is not None:
            state["projection_widths"] = list(self.widths)
            state["projections"] = self.projections.state_dict()
            if self.projection_optimizer is not None:
                state["projection_optimizer"] = self.projection_optimizer.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "projections" in state:
            self._build_projections(list(state["projection_widths"]))
            self.projections.load_state_dict(state["projections"])
            if "projection_optimizer" in state:
                self.projection_optimizer.load_state_dict(state["projection_optimizer"])
