"""The multi-exit contract: the only thing strategies and evaluation know about a backbone.

A MultiExitNet is a stem, K stages and K heads. Exit k reads the state after stage k:

    state = stem(x)
    for k in 1..K:  state = stage_k(state);  logits_k = head_k(state)

`forward(x, upto=k)` runs only stages and heads 1..k (per-exit cost, real early exit).
`boundary(k, state) -> (to_head, to_next)` is the point between stages where a strategy may act on
gradients (gradient equilibrium rescales the two paths differently). A state is a tensor or any
nested list/tuple/dict of tensors; `map_state` applies a function to every tensor in it.

Optional: `head_embedded(k, state) -> (logits, embedding)`, the embedding being the [N, D_k] vector the
head's final linear layer reads; with it `forward(x, embeddings=True)` returns (logits, embeddings) from
the same single pass (BYOT's feature hints). `head_module(k)` names the module of head k (training
regimes freeze everything else); the default is `self.heads[k]`.
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

    def head_embedded(self, k: int, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """Optional: (logits, embedding) of head k, the embedding being what its final linear layer reads."""
        raise NotImplementedError(f"{type(self).__name__} does not expose per-exit embeddings")

    @property
    def has_embeddings(self) -> bool:
        return type(self).head_embedded is not MultiExitNet.head_embedded

    def head_module(self, k: int) -> nn.Module:
        """The module holding head k's parameters and buffers (nothing of the stem or the stages)."""
        return self.heads[k]

    def forward(self, x: torch.Tensor, upto: int | None = None, boundary: Boundary | None = None,
                embeddings: bool = False) -> list | tuple[list, list]:
        """Logits of exits 1..upto (all exits by default), in order; with `embeddings`, (logits, embeddings)."""
        upto = self.num_exits if upto is None else upto
        if not 1 <= upto <= self.num_exits:
            raise ValueError(f"upto must be in 1..{self.num_exits}, got {upto}")
        state = self.stem(x)
        outputs, embeds = [], []
        for k in range(upto):
            state = self.stage(k, state)
            to_head, to_next = boundary(k, state) if boundary is not None else (state, state)
            if embeddings:
                logits, embedding = self.head_embedded(k, to_head)
                embeds.append(embedding)
            else:
                logits = self.head(k, to_head)
            outputs.append(logits)
            state = to_next
        return (outputs, embeds) if embeddings else outputs


def sequential_head_embedded(head: nn.Module, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logits, input of the last nn.Linear) of a head built from nested nn.Sequential containers, whose
    forward is the composition of its leaves; None if the head has no Linear layer."""
    modules = list(leaves(head))
    last = max((i for i, m in enumerate(modules) if isinstance(m, nn.Linear)), default=None)
    if last is None:
        return None
    embedding = state
    for m in modules[:last]:
        embedding = m(embedding)
    logits = embedding
    for m in modules[last:]:
        logits = m(logits)
    return logits, embedding


def leaves(module: nn.Module):
    """The modules of nested nn.Sequential containers in forward order."""
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from leaves(child)
    else:
        yield module


class Truncated(nn.Module):
    """`model` run up to exit k, returning a tuple of its k logits (what cost counters trace)."""

    def __init__(self, model: MultiExitNet, upto: int):
        super().__init__()
        self.model, self.upto = model, upto

    def forward(self, x: torch.Tensor) -> tuple:
        return tuple(self.model(x, upto=self.upto))
