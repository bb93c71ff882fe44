"""`cagrad`: conflict-averse gradient descent (Liu et al., NeurIPS 2021), the exits as tasks.

As Cranial-XIX/CAGrad's `cagrad(grads, alpha, rescale)` (nyuv2/utils.py): with G [K, D] the exits'
shared-parameter gradients, g0 = mean_k g_k, A = G G^T, c = alpha * |g0| (+1e-8), the dual
    min_{w in simplex} w^T A (1/K) + c * sqrt(w^T A w + 1e-8)
is solved by scipy's SLSQP from the uniform start (the reference's exact call), then
    g_w = G^T w,  d = g0 + c / |g_w| * g_w,  divided by (1 + alpha^2) (rescale 1, the reference's
    default; 2 divides by 1 + alpha, 0 leaves d),
and multiplied by K (the reference's overwrite_grad, "to match the sum loss"). Heads keep their own exit's
gradient (methods/surgery.py). The K x K Gram matrix goes to the host once per iteration for the solve.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from bench.registry import METHODS, Params
from methods.surgery import GradientSurgery


def cagrad_direction(G: torch.Tensor, alpha: float, rescale: int = 1) -> torch.Tensor:
    """The conflict-averse direction for G [K, D], in the mean-gradient scale (not yet times K)."""
    from scipy.optimize import minimize

    K = G.shape[0]
    A = (G.double() @ G.double().T).cpu().numpy()
    g0_norm = float(np.sqrt(A.mean() + 1e-8))  # |mean_k g_k|
    c = alpha * g0_norm + 1e-8
    b = np.ones(K) / K

    def objective(w):
        return float(w @ A @ b + c * np.sqrt(w @ A @ w + 1e-8))

    simplex = ({"type": "eq", "fun": lambda w: 1 - w.sum()},)
    res = minimize(objective, b.copy(), bounds=[(0, 1)] * K, constraints=simplex)  # SLSQP, as the reference
    w = torch.as_tensor(res.x, dtype=G.dtype, device=G.device)
    gw = w @ G
    d = G.mean(0) + c / (gw.norm() + 1e-8) * gw
    return d if rescale == 0 else d / (1 + alpha**2) if rescale == 1 else d / (1 + alpha)


class CAGradParams(Params):
    c: float = Field(0.5, ge=0, description="conflict-aversion radius c (the reference's --alpha)")
    rescale: Literal[0, 1, 2] = Field(1, description="divide the direction by 1 (0), 1 + c^2 (1) or 1 + c (2)")


@METHODS.register("cagrad", CAGradParams)
class CAGrad(GradientSurgery):
    """CAGrad over the exit losses: the conflict-averse direction on the shared parameters (c = 0.5)."""

    def combine(self, G):
        return G.shape[0] * cagrad_direction(G, self.params.c, self.params.rescale)
