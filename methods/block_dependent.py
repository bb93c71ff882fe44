"""`block-dependent`: block-dependent losses (Han et al., IEEE TNNLS 2023; savertm/Block-Dependent-Losses-for-
Multi-Exit-Networks, `MSDNet_block_dependent_loss_/models/msdnet_overlap.py` `MSDNet_overlap.forward`,
`main_block7.py` `train`, `main_block7_distil.py` `train`, `args.py`, `train.sh`).

The objective is the sum of the exits' cross-entropies, but exit k's loss trains only a window of the stages
before it: its head reads stages s_k..k run on the detached state after stage s_k - 1 (the forward values are
the same; the reference recomputes the blocks on detached copies, `[x_com.clone().detach() for x_com in x]`).
With stages and exits 1-based, K exits and W = `overlap`:
- `conventional`: s_k = 1 (every exit trains everything before it: `--arch msdnet`, MSDNet's sum);
- `overlap`: s_k = max(1, k - W + 1), the last W stages (`--method overlap --overlap 3`);
- `no_overlap`: one cut after stage `cut`: s_k = 1 for k <= cut, cut + 1 beyond (the reference cuts after
  block 3 in both its 7-block CIFAR and 5-block ImageNet models, whatever `--overlap` says);
- `local_error`: s_k = k, each exit trains its own stage only (W = 1);
- `include_final: true`: the last exit trains every stage, s_K = 1 (the reference reads the flag in
  `overlap` only; here it applies to every variant).
The stem counts as part of stage 1.

With `distill: true` (`main_block7_distil.py`, `--self_distillation True`) every exit adds
distill_co * KL(sg(p_K) || p_k), p = softmax(z / T), summed over classes and averaged over samples, with no T^2
factor (exit K's own term is 0 with zero gradient); the reference's pretrained-teacher variant
(`--self_distillation False`, a teacher checkpoint) is not offered.

Defaults: `overlap` with W = 3, `include_final: false` (args.py defaults; train.sh's "overlap 3 without final
loss" line); cut 3 (the models' hard-coded cut); distill off (train.sh's first runs use `main_block7.py`,
which does not distil); distill_co 0.25 and T = 1.5 (train.sh's self-distillation run of the same variant,
`--distill_co 0.25` without `--T`, args.py's 1.5).

How: one forward through the contract. The forward carries one chain of stages; the boundary runs the other
windows' chains through the model's own `stage(k, state)` (as many stage runs as the reference's
recomputation) and hands each head the state of its exit's chain. Recomputing a stage in train mode updates its
BatchNorm running statistics once per run, as in the reference.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from bench.backbones.contract import map_state
from bench.errors import ConfigError
from bench.registry import METHODS, Params
from methods.base import Strategy, measure, per_exit_ce


class BlockDependentParams(Params):
    variant: Literal["conventional", "overlap", "no_overlap", "local_error"] = Field(
        "overlap", description="which stages each exit's loss trains (--method; conventional: --arch msdnet)")
    overlap: int = Field(3, ge=1, description="overlap: each exit trains its last W stages (--overlap)")
    include_final: bool = Field(False, description="the last exit trains every stage (--include_final)")
    cut: int = Field(3, ge=1, description="no_overlap: the stage after which the state is detached")
    distill: bool = Field(False, description="self-distillation from the detached last exit (--self_distillation)")
    distill_co: float = Field(0.25, ge=0, description="weight of each exit's distillation term (--distill_co)")
    temperature: float = Field(1.5, gt=0, description="distillation softmax temperature (--T)")


def window_starts(p: BlockDependentParams, num_exits: int) -> list[int]:
    """s_k (0-based) of every exit: the first stage exit k's loss trains."""
    K = num_exits
    if p.variant == "conventional":
        starts = [0] * K
    elif p.variant == "overlap":
        starts = [max(0, k - p.overlap + 1) for k in range(K)]
    elif p.variant == "local_error":
        starts = list(range(K))
    else:
        if p.cut >= K:
            raise ConfigError(f"method.cut: the cut must fall between two of the {K} stages (1..{K - 1}), "
                              f"got {p.cut}")
        starts = [0 if k < p.cut else p.cut for k in range(K)]
    if p.include_final:
        starts[-1] = 0
    return starts


def _detached(state):
    return map_state(lambda t: t.detach().clone(), state)


class Windows:
    """The boundary of one forward: chains of stages, one per window start, the forward carrying one of them."""

    def __init__(self, model, starts: list[int]):
        self.model, self.starts = model, starts
        self.last_reader = {s: max(k for k, t in enumerate(starts) if t == s) for s in set(starts)}
        self.chains: dict[int, object] = {}  # start -> state after the previous stage (not the carried chain)
        self.carried = 0

    def __call__(self, k: int, state):
        for s in list(self.chains):  # the other chains through stage k
            self.chains[s] = self.model.stage(k, self.chains[s])
        self.chains[self.carried] = state
        s = self.starts[k]
        to_head = self.chains[s]
        if self.last_reader[s] == k:
            del self.chains[s]
        if k + 1 in self.last_reader and k + 1 < len(self.starts):  # a window starting at stage k + 1
            self.chains[k + 1] = _detached(state)
        if not self.chains:  # the last exit: nothing further
            return to_head, state
        self.carried = max(self.chains)  # the newest chain goes through the forward's next stage
        return to_head, self.chains.pop(self.carried)


def self_distillation(logits: list[torch.Tensor], T: float) -> list[torch.Tensor]:
    """Per exit KL(sg(p_K) || p_k) at temperature T, summed over classes, mean over samples."""
    teacher = F.softmax(logits[-1].detach() / T, dim=1)
    log_teacher = F.log_softmax(logits[-1].detach() / T, dim=1)
    return [(teacher * (log_teacher - F.log_softmax(z / T, dim=1))).sum(1).mean() for z in logits]


@METHODS.register("block-dependent", BlockDependentParams)
class BlockDependent(Strategy):
    """Block-dependent losses: each exit's cross-entropy trains only a window of the stages before it."""

    # A sum of means over samples, each exit's gradient confined to its window per sample: DDP's average of
    # the workers' gradients is the one-process gradient (the stage reruns happen inside the one DDP forward).
    distributed = True

    def __init__(self, params: BlockDependentParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        self.starts = window_starts(params, model.num_exits)

    def step(self, x, y, iteration):
        with self.autocast():
            logits = self.model(x, boundary=Windows(self.model, self.starts))
            losses = per_exit_ce(logits, y)
            objective = losses.mean(0).sum()
            if self.params.distill:
                kl = self_distillation(logits, self.params.temperature)
                objective = objective + self.params.distill_co * sum(kl)
        self.optimizer_step(objective)
        return measure(logits, y, losses, objective)
