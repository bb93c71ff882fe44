"""Readouts: what exit k reports, as a function of the raw logits of exits 1..k.

A strategy may own a readout (Boosted's boosted sum, ZTW's cascade + ensembles); every other strategy
has the identity. A readout is part of the trained model: built from the method config alone (so
`exitbench evaluate` rebuilds it without any optimiser), saved in the checkpoint under "readout", and
applied wherever exits are read: the per-epoch validation accuracy, the final evaluation, `logits.pt`
(readout outputs as `*_logits`, used by every metric, the backbone's raw exits beside them as
`*_raw_logits`), hence `exitbench budget` and the threshold sweep, and real early-exit inference.

The one entry point is `readout_outputs(readout, logits)`. A readout implements `exit(k, logits_k,
carry) -> (output_k, carry)`: it is called for k = 0, 1, ... in order with exit k's raw logits and the
carry exit k-1 returned (None at k = 0), and sees nothing else, so exit k's output can only depend on
exits 1..k, and early-exit inference can compute it the moment head k has run. `build_readout` also
checks this on random logits (`check_causal`) before a readout is used.

Its cost: `exit_macs()` gives each exit's own multiply-adds (counted as fvcore counts the same ops:
a C x C Linear is C^2, an affine LayerNorm 5 C, elementwise ops and softmaxes nothing); the cumulative sum
is added to the backbone's cumulative per-exit MACs (inference that reaches exit k has run readouts 1..k).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import accumulate
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn


class Readout(nn.Module):
    """The identity: exit k reports its raw logits. Subclasses override `exit` and `exit_macs`."""

    def __init__(self, num_exits: int, num_classes: int):
        super().__init__()
        self.num_exits, self.num_classes = num_exits, num_classes

    def exit(self, k: int, logits: torch.Tensor, carry: Any) -> tuple[torch.Tensor, Any]:
        """Exit k's (0-based) output from its raw logits [N, C] and what exit k-1 carried over."""
        return logits, carry

    def exit_macs(self) -> list[int]:
        """Multiply-adds of each exit's own readout step, per sample (not cumulative)."""
        return [0] * self.num_exits


def readout_outputs(readout: Readout, logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """What exits 1..len(logits) report: the readout applied exit by exit, in order."""
    if len(logits) > readout.num_exits:
        raise ValueError(f"the readout was built for {readout.num_exits} exits, got {len(logits)} logits")
    carry, outputs = None, []
    for k, z in enumerate(logits):
        out, carry = readout.exit(k, z, carry)
        outputs.append(out)
    return outputs


def readout_macs(readout: Readout) -> list[int]:
    """Cumulative readout multiply-adds per exit (what is added to the backbone's cumulative MACs)."""
    return list(accumulate(readout.exit_macs()))


@torch.no_grad()
def check_causal(readout: Readout, samples: int = 3) -> None:
    """Assert that exit k's output does not change when exits k+1..K change (random logits, eval mode)."""
    K, C = readout.num_exits, readout.num_classes
    was_training = readout.training
    readout.eval()
    try:
        device = next((p.device for p in readout.parameters()), torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        base = [torch.randn(samples, C, generator=generator).to(device) for _ in range(K)]
        reference = readout_outputs(readout, base)
        assert len(reference) == K, f"{type(readout).__name__} returned {len(reference)} outputs for {K} exits"
        for k in range(K - 1):
            changed = base[:k + 1] + [torch.randn(samples, C, generator=generator).to(device) for _ in range(K - k - 1)]
            for j, out in enumerate(readout_outputs(readout, changed)[:k + 1]):
                if not torch.equal(out, reference[j]):
                    raise AssertionError(f"{type(readout).__name__}: exit {j + 1}'s output changed when exits "
                                         f"{k + 2}..{K} changed; an exit may only read exits 1..itself")
    finally:
        readout.train(was_training)


def build_readout(method: Mapping[str, Any], num_exits: int, num_classes: int) -> Readout:
    """The readout of a method config ({name: ..., params}): the strategy class's `build_readout(params,
    num_exits, num_classes)` if it has one, else the identity; checked causal."""
    from bench.registry import METHODS, load_all

    load_all()
    values = dict(method.model_dump() if isinstance(method, BaseModel) else method)
    name = values.pop("name")
    params = METHODS.params(name, values, where="method")
    make = getattr(METHODS.get(name).factory, "build_readout", None)
    readout = make(params, num_exits, num_classes) if make is not None else Readout(num_exits, num_classes)
    check_causal(readout)
    return readout
