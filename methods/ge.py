"""`ge`: gradient equilibrium (IMTA, Li et al. ICCV 2019).

The loss is the uniform sum of per-exit cross-entropies; only the backward pass changes. At the boundary
after stage k (1-based, K exits) the gradient flowing back from head k is scaled by 1/(K-k+1) and the
gradient flowing back from the later stages by (K-k)/(K-k+1), so the gradient reaching stage k is an
average of what its head and its successors ask for rather than their sum (which grows with depth).

`scope` says which tensors of the stage state are rescaled:
- `all` (default): every tensor in the state, the paper's formula applied to the whole feature.
- `coarsest`: only the last tensor of a list/tuple state, as kalviny/IMTA's msdnet_ge does for MSDNet
  (`x[-1]`, the coarsest scale, which is all the MSDNet classifier reads); gradients reaching the finer
  scales from later blocks are then not rescaled. For a single-tensor state both scopes agree.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from bench.backbones.contract import map_state
from bench.errors import UsageError
from bench.registry import METHODS, Params
from methods.base import Strategy, measure, per_exit_ce


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        # A clone, not a view: a custom Function's view output may not be modified in place downstream
        # (in-place ReLU after a boundary is common), and the copy is cheap next to a stage's convolutions.
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, scale)


def _rescale(state, scale: float, scope: str):
    if scope == "all" or isinstance(state, torch.Tensor):
        return map_state(lambda t: scale_grad(t, scale), state)
    if isinstance(state, (list, tuple)) and state:
        out = list(state)
        out[-1] = scale_grad(out[-1], scale)
        return out if isinstance(state, list) else tuple(out)
    raise UsageError(f"method.scope=coarsest needs a tensor or list state, got {type(state).__name__}; "
                     f"use scope=all")


def equilibrium(k: int, state, num_exits: int, scope: str = "all"):
    """The boundary after stage k (0-based) of `num_exits`: (to_head, to_next), the head's path scaled by
    1/(K-k), the later stages' by (K-k-1)/(K-k). Also used by strategies that add gradient equilibrium."""
    remaining = num_exits - k
    to_head = _rescale(state, 1.0 / remaining, scope)
    if remaining == 1:  # the last stage feeds nothing further
        return to_head, state
    return to_head, _rescale(state, (remaining - 1) / remaining, scope)


class GEParams(Params):
    scope: Literal["all", "coarsest"] = Field(
        "all", description="rescale every tensor of the stage state (paper) or only the last one (IMTA code)")


@METHODS.register("ge", GEParams)
class GradientEquilibrium(Strategy):
    """Uniform loss with gradients rescaled at stage boundaries (IMTA's gradient equilibrium)."""

    distributed = True  # a mean over samples: DDP's gradient average is the one-process gradient

    def boundary(self, k: int, state):
        """k is 0-based: head gets 1/(K-k), later stages (K-k-1)/(K-k)."""
        return equilibrium(k, state, self.model.num_exits, self.params.scope)

    def step(self, x, y, iteration):
        with self.autocast():
            logits = self.model(x, boundary=self.boundary)
            losses = per_exit_ce(logits, y)
            objective = losses.mean(0).sum()
        self.optimizer_step(objective)
        return measure(logits, y, losses, objective)
