"""`uniform`: sum_k w_k * CE_k with w_k = 1 (MSDNet); optional fixed per-exit weights and label smoothing."""

from __future__ import annotations

import torch
from pydantic import Field

from bench.registry import METHODS, Params
from methods.base import Strategy, measure, per_exit_ce


class UniformParams(Params):
    exit_weights: list[float] | None = Field(None, description="fixed per-exit weights (default all 1)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@METHODS.register("uniform", UniformParams)
class Uniform(Strategy):
    """Equal-weight sum of per-exit cross-entropies (MSDNet)."""

    def __init__(self, params: UniformParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        k = model.num_exits
        weights = params.exit_weights or [1.0] * k
        if len(weights) != k:
            from bench.errors import ConfigError

            raise ConfigError(f"method.exit_weights: {k} exits need {k} weights, got {len(weights)}")
        self.weights = torch.tensor(weights, device=self.device)

    def step(self, x, y, iteration):
        with self.autocast():
            logits = self.model(x)
            losses = per_exit_ce(logits, y, self.params.label_smoothing)
            objective = (losses.mean(0) * self.weights).sum()
        self.optimizer_step(objective)
        return measure(logits, y, losses, objective)
