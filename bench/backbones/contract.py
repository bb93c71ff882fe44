"""The multi-exit contract: the only thing strategies and evaluation know about a backbone.

A MultiExitNet is a stem, K stages and K heads. Exit k reads the state after stage k:

    state = stem(x)
    for k in 1..K:  state = stage_k(state);  logits_k = head_k(state)

`forward(x, upto=k)` runs only stages and heads 1..k (per-exit cost, real early exit).
`boundary(k, state) -> (to_head, to_next)` is the point between stages where a strategy may act on
gradients (gradient equilibrium rescales the two paths differently). A state is a tensor or any
nested list/tuple/dict of tensors; `map_state` applies a function to every tensor in it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

State = Any
Boundary = Callable[[int, State], tuple[State, State]]


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, state)


class MultiExitNet(nn.Module):
    """Subclasses implement `stem`, `stage(k, state)` and `head(k, state)` (k is 0-based) and set
    `num_exits`. Everything else (forward, truncation, boundaries) is shared."""

    num_exits: int

    def stem(self, x: torch.Tensor) -> State:
        return x

    def stage(self, k: int, state: State) -> State:
        raise NotImplementedError

    def head(self, k: int, state: State) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, upto: int | None = None, boundary: Boundary | None = None) -> list:
        """Logits of exits 1..upto (all exits by default), in order."""
        upto = self.num_exits if upto is None else upto
        if not 1 <= upto <= self.num_exits:
            raise ValueError(f"upto must be in 1..{self.num_exits}, got {upto}")
        state = self.stem(x)
        outputs = []
        for k in range(upto):
            state = self.stage(k, state)
            to_head, to_next = boundary(k, state) if boundary is not None else (state, state)
            outputs.append(self.head(k, to_head))
            state = to_next
        return outputs


class Truncated(nn.Module):
    """`model` run up to exit k, returning a tuple of its k logits (what cost counters trace)."""

    def __init__(self, model: MultiExitNet, upto: int):
        super().__init__()
        self.model, self.upto = model, upto

    def forward(self, x: torch.Tensor) -> tuple:
        return tuple(self.model(x, upto=self.upto))
