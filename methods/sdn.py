"""`sdn`: Shallow-Deep Networks' epoch-dependent weights (Kaya et al., ICML 2019; yigitcankaya/Shallow-Deep-Networks
`model_funcs.py`, `sdn_train` and `sdn_training_step`).

    L = sum_{k<K} tau_k(e) * CE_k + CE_K,    tau_k(e) = min(C_k, 0.01 + e * C_k / E)

with e = 1..E the current epoch, 1-based as the reference's `for epoch in range(1, epochs+1)` (so the last
epoch reaches tau = C) and E the number of epochs. C is the reference's `max_coeffs` [0.15, 0.3, 0.45, 0.6,
0.75, 0.9] for six internal exits (every SDN network has six); for other counts it is spaced the same way,
linearly from 0.15 to 0.9 (one internal exit: 0.15, the reference's first value). Under a two-phase training
regime e and E count the epochs of phase 2.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from bench.errors import ConfigError
from bench.registry import METHODS, Params
from methods.base import Strategy, measure, per_exit_ce

REFERENCE_C = [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]


def default_c(internal_exits: int) -> list[float]:
    if internal_exits == len(REFERENCE_C):
        return list(REFERENCE_C)
    return [float(c) for c in np.linspace(REFERENCE_C[0], REFERENCE_C[-1], internal_exits)]


class SDNParams(Params):
    c: list[float] | None = Field(
        None, description="maximum weight C_k of each internal exit (default: 0.15 .. 0.9 linearly, the reference's)")


@METHODS.register("sdn", SDNParams)
class ShallowDeep(Strategy):
    """Internal exits weighted by tau_k(e) = min(C_k, 0.01 + e C_k / E), the last exit by 1 (SDN)."""

    distributed = True  # a mean over samples: DDP's gradient average is the one-process gradient

    def __init__(self, params: SDNParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        n = model.num_exits - 1
        c = default_c(n) if params.c is None else list(params.c)
        if len(c) != n:
            raise ConfigError(f"method.c: {n} internal exits need {n} values, got {len(c)}")
        if any(v < 0 for v in c):
            raise ConfigError(f"method.c: values must be >= 0, got {c}")
        self.c = c
        self.epochs = max(1, self.total_steps // self.steps_per_epoch)

    def taus(self, epoch: int) -> list[float]:
        """tau_k at 0-based `epoch` (the reference's epoch is this + 1)."""
        e = epoch + 1
        return [min(c, 0.01 + e * c / self.epochs) for c in self.c]

    def step(self, x, y, iteration):
        taus = self.taus(iteration // self.steps_per_epoch)
        with self.autocast():
            logits = self.model(x)
            losses = per_exit_ce(logits, y)
            ce = losses.mean(0)
            objective = ce[-1] + sum(tau * ce[k] for k, tau in enumerate(taus))
        self.optimizer_step(objective)
        return measure(logits, y, losses, objective)
