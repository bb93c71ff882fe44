"""Training regimes (Kubaty et al. 2024, arXiv 2407.14320; SDN's "IC-only" training): which parameters train,
with which objective, in which epochs. The trial loop asks this module four things: the LR schedule position
of an iteration, the strategy to step, how to set the model up at the start of an epoch, and the epoch's phase.

- joint (default): one phase; the strategy trains everything.
- disjoint: phase 1 trains the backbone with the last exit only (`uniform` with the `last` schedule, so the
  earlier heads get no gradient); phase 2 trains the earlier exits' heads with the strategy's objective on
  the frozen backbone (stem, stages and the last head).
- mixed: phase 1 as disjoint; phase 2 trains everything with the strategy.

Phase 1 is `regime.phase1` of the epochs (rounded, at least one epoch per phase). Phase 2 starts as a new
training run would: the LR schedule (warm-up included) restarts over phase 2's epochs, the optimiser's
momentum is cleared, and the strategy counts its iterations and epochs from the start of phase 2 (sdn's
tau, kd-anneal's T). Frozen means no gradient (requires_grad off, so no weight decay or momentum either)
and eval mode for every frozen module, so BatchNorm statistics stay as phase 1 left them (and dropout in
the backbone is off). The phase of an epoch follows from its index, so a checkpoint resumes inside either
phase exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.backbones.contract import MultiExitNet
from bench.config import RegimeConfig
from bench.registry import METHODS


class Regime:
    def __init__(self, cfg: RegimeConfig, epochs: int, steps_per_epoch: int):
        self.name = cfg.name
        self.phase1_epochs = cfg.phase1_epochs(epochs)
        self.phase1_steps = self.phase1_epochs * steps_per_epoch
        self.total_steps = epochs * steps_per_epoch

    def phase(self, epoch: int) -> int:
        """1 or 2 for the 0-based `epoch` (a joint run is one phase: 1)."""
        return 2 if self.name != "joint" and epoch >= self.phase1_epochs else 1

    def schedule_position(self, iteration: int) -> tuple[int, int]:
        """(iteration within its phase, iterations in that phase): the LR schedule restarts at phase 2."""
        if self.name == "joint":
            return iteration, self.total_steps
        if iteration < self.phase1_steps:
            return iteration, self.phase1_steps
        return iteration - self.phase1_steps, self.total_steps - self.phase1_steps

    def build_strategy(self, method: dict[str, Any], **context: Any):
        """The configured strategy (joint), or the two phases' strategies behind one object."""
        values = dict(method)
        name = values.pop("name")
        if self.name == "joint":
            return METHODS.build(name, values, **context)
        # Phase 1 trains the raw last exit; a readout (bench.readout) belongs to the configured strategy.
        plain = {k: v for k, v in context.items() if k != "readout"}
        phase1 = METHODS.build("last", {}, **{**plain, "total_steps": self.phase1_steps})
        phase2 = METHODS.build(name, values, **{**context, "total_steps": self.total_steps - self.phase1_steps})
        return Phased(phase1, phase2, self.phase1_steps)

    def begin_epoch(self, epoch: int, model: MultiExitNet, optimizer: torch.optim.Optimizer) -> None:
        """Train mode and trainable parameters for the epoch (called instead of model.train())."""
        model.train()
        if self.name == "joint":
            return
        frozen = self.name == "disjoint" and self.phase(epoch) == 2
        for p in model.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            model.eval()  # BatchNorm statistics and dropout of everything frozen
            for k in range(model.num_exits - 1):
                head = model.head_module(k)
                head.train()
                for p in head.parameters():
                    p.requires_grad_(True)
        if epoch == self.phase1_epochs:
            optimizer.state.clear()  # phase 2 starts with fresh momentum, as a new run would


class Phased:
    """Steps phase 1's strategy, then phase 2's with iterations counted from phase 2's start. Everything
    else (hooks a strategy may offer) is the configured strategy's, i.e. phase 2's."""

    def __init__(self, phase1, phase2, phase1_steps: int):
        self.phase1, self.strategy, self.phase1_steps = phase1, phase2, phase1_steps

    def step(self, x, y, iteration):
        if iteration < self.phase1_steps:
            return self.phase1.step(x, y, iteration)
        return self.strategy.step(x, y, iteration - self.phase1_steps)

    def end_epoch(self, epoch: int, loader) -> None:
        """The epoch's phase's epoch-level work, epochs counted from that phase's start (Meta-GF's fusion)."""
        phase1_epochs = self.phase1_steps // self.phase1.steps_per_epoch
        if epoch < phase1_epochs:
            self.phase1.end_epoch(epoch, loader)
        else:
            self.strategy.end_epoch(epoch - phase1_epochs, loader)

    def distribute(self, model, group) -> None:
        """Both phases train through the one DDP wrapper (two would reduce every gradient twice)."""
        self.phase1.distribute(model, group)
        self.strategy.distribute(model, group)

    def state_dict(self) -> dict[str, Any]:
        return {"phase1": self.phase1.state_dict(), "phase2": self.strategy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase1.load_state_dict(state["phase1"])
        self.strategy.load_state_dict(state["phase2"])

    def __getattr__(self, name: str):
        return getattr(self.__dict__["strategy"], name)
