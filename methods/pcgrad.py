"""`pcgrad`: projecting conflicting gradients (Yu et al., NeurIPS 2020), the exits as tasks.

For every exit i, its shared-parameter gradient g_i is projected, in a random order of the other exits j,
onto the normal plane of each original g_j it conflicts with: if g_i . g_j < 0,
g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j (paper Algorithm 1; WeiChengTseng/Pytorch-PCGrad draws a fresh
order per i, tianheyu927/PCGrad projects against the unprojected g_j). The update is the sum of the
projected gradients (tianheyu927's reduce over tasks; Cranial-XIX/CAGrad's pcgrad times the task count
"to match the sum loss"), so without conflicts it is exactly uniform's gradient. Heads keep their own
exit's gradient (methods/surgery.py). The order comes from the strategy's own seeded generator, saved
with the checkpoint, so a resumed run draws the same orders.
"""

from __future__ import annotations

import torch
from pydantic import Field

from bench.registry import METHODS, Params
from methods.surgery import GradientSurgery


def project_conflicting(G: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """G [K, D] per-exit gradients; orders[i] the other exits in the order i is projected against.
    Returns the sum over i of the projected g_i."""
    projected = G.clone()
    sq_norm = (G * G).sum(1)
    safe = torch.where(sq_norm > 0, sq_norm, torch.ones_like(sq_norm))  # g_j = 0 never conflicts (dot = 0)
    for i, order in enumerate(orders):
        for j in order:
            dot = projected[i] @ G[j]
            projected[i] -= dot.clamp(max=0) / safe[j] * G[j]  # no host sync: clamp instead of `if dot < 0`
    return projected.sum(0)


class PCGradParams(Params):
    seed: int | None = Field(None, description="seed of the projection order (default: the trial seed)")


@METHODS.register("pcgrad", PCGradParams)
class PCGrad(GradientSurgery):
    """PCGrad over the exit losses: conflicting shared gradients projected, in a seeded random order."""

    def __init__(self, params: PCGradParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        self.generator = torch.Generator().manual_seed(torch.initial_seed() if params.seed is None else params.seed)

    def orders(self, K: int) -> list[list[int]]:
        out = []
        for i in range(K):
            others = [j for j in range(K) if j != i]
            out.append([others[int(t)] for t in torch.randperm(K - 1, generator=self.generator)])
        return out

    def combine(self, G):
        return project_conflicting(G, self.orders(G.shape[0]))

    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
