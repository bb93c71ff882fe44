"""`uniform`: sum_k w_k * CE_k with fixed per-exit weights; optional label smoothing.

`exit_weights` is an explicit list (one weight per exit) or a named schedule:
- `uniform` (the default, also `null`): w_k = 1, MSDNet's sum of per-exit losses;
- `linear`: w_k = k / sum_j j, "weighted average by depth" (PABEE `modeling_albert`, GPF as ZTW reimplements it);
- `last`: only the last exit (w_K = 1): the single-exit baseline every paper compares against.
Presets `linear` and `last` name the schedules. Exits of weight 0 are left out of the objective, so their
heads get no gradient (and no weight decay) rather than a zero one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from bench.errors import ConfigError
from bench.registry import METHODS, Params
from methods.base import Strategy, measure

SCHEDULES = ("uniform", "linear", "last")


def schedule_weights(name: str, num_exits: int) -> list[float]:
    """The weights of a named schedule for `num_exits` exits."""
    if name == "uniform":
        return [1.0] * num_exits
    if name == "linear":
        total = num_exits * (num_exits + 1) / 2
        return [k / total for k in range(1, num_exits + 1)]
    return [0.0] * (num_exits - 1) + [1.0]


class UniformParams(Params):
    exit_weights: list[float] | str | None = Field(
        None, description=f"a list with one weight per exit, or a schedule: {', '.join(SCHEDULES)} (default: all 1)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    @field_validator("exit_weights", mode="before")
    @classmethod
    def _schedule(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in SCHEDULES:
            raise ValueError(f"unknown schedule {v!r}; give one of {', '.join(SCHEDULES)} or a list of weights")
        numbers = isinstance(v, list) and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in v)
        if isinstance(v, list) and numbers and (min(v, default=-1) < 0 or sum(v) <= 0):
            raise ValueError("weights must be numbers >= 0, one per exit, not all 0")
        return v


@METHODS.register("uniform", UniformParams)
class Uniform(Strategy):
    """Fixed-weight sum of per-exit cross-entropies (MSDNet; linear and last-only schedules)."""

    distributed = True  # a mean over samples: DDP's gradient average is the one-process gradient

    def __init__(self, params: UniformParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        k = model.num_exits
        weights = params.exit_weights
        if weights is None or isinstance(weights, str):
            weights = schedule_weights(weights or "uniform", k)
        if len(weights) != k:
            raise ConfigError(f"method.exit_weights: {k} exits need {k} weights, got {len(weights)}")
        self.weights = weights

    def leaves_parameters_unused(self) -> bool:
        return 0 in self.weights  # a head of weight 0 is left out of the objective

    def step(self, x, y, iteration):
        with self.autocast():
            logits = self.model(x)
            ce = [F.cross_entropy(z, y, reduction="none", label_smoothing=self.params.label_smoothing)
                  for z in logits]
            losses = torch.stack(ce, dim=1)
            # from the per-exit terms, not the stack: a 0-weight head stays out of the graph (grad None)
            objective = sum(w * ce[k].mean() for k, w in enumerate(self.weights) if w != 0)
        self.optimizer_step(objective)
        return measure(logits, y, losses, objective)


METHODS.add_preset("linear", "uniform", doc="w_k = k / sum_j j (PABEE / GPF weighted average by depth)",
                   exit_weights="linear")
METHODS.add_preset("last", "uniform", doc="the last exit only: the single-exit baseline", exit_weights="last")
