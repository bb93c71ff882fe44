"""`dfs`: Deep Feature Surgery (Gong et al., ECCV 2024; GongCheng1919/dfs `src/models/feature_reroute.py`,
`src/models/dns_msdnet.py` `MSDNet.forward`, `src/train.py` `MTLLoss`).

Feature partitioning and feature referencing at every boundary between stages k and k+1 (k < K; none after
the last stage, as `dns_msdnet.py`): the stage output x is split along its channels into the first
C1 = round(C * ratio) channels and the other C - C1 (`FeatureReroute`);
- the path to the deeper stages gets x_plus = cat(x[:C1], sg(x[C1:])): the deeper exits update only the
  first part of stage k's features (and everything before it through those channels);
- the head gets x_sub = x, the whole feature with its gradient (feature referencing, `use_fr=1`: the shallow
  exit reuses the shared part and trains all of it).
The forward values are unchanged; only the gradients are partitioned. Edge cases as `FeatureReroute`:
ratio 1 gives x_plus = x and x_sub = sg(x) (the earlier heads then train only themselves), ratio 0 gives
x_plus = sg(x), x_sub = x (each stage trained by its own exit only).

Objective (`MTLLoss`, `--useKD 0` in `scripts/training_msdnet_on_cifar100.sh`): sum_k CE_k. With `kd: true`
(`--useKD 1`): CE_K + sum_{k<K} [(1 - gamma) CE_k + gamma * CE(softmax(sg z_K / T), softmax(z_k / T))], the
soft-target cross-entropy `KDCrossEntropy` with no T^2 factor, as the code writes it.

Defaults: ratio 0.5 (`--dns-ratio`, argparse default and the script's checkpoint name `dns_ratio-0.5`); kd off
(the script's `--useKD 0`); T = 3, gamma = 0.9 (the script's `-T 3.0 --gamma 0.9`, also the argparse defaults).

Departures, where the contract does not offer what DFS needs:
- Which tensors of a stage state the head reads is not part of the contract. `scope: head` (default)
  partitions the state's head-facing tensors: a tensor state itself, the last tensor of a list/tuple state
  (MSDNet's coarsest scale, the reference's `x[-1]`; the finer scales pass on untouched, as there), the
  top-level tensors of a dict state (RANet's `x`). `scope: all` partitions every tensor of the state.
- The channel axis is dim 1 for feature maps [N, C, H, W] and vectors [N, D], the last dim for token
  sequences [N, T, D] (as `dns_vit.py` splits with `chanel_axis=-1`); 1-D tensors pass untouched.
- `use_fr=0` (x_plus and x_sub zero-padded halves: a different forward, at evaluation too) cannot be written
  through the boundary, which acts only in training: not offered. `useFD` (feature distillation, off in the
  script) is not offered either.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from bench.backbones.contract import map_state
from bench.registry import METHODS, Params
from methods.base import Strategy, measure, per_exit_ce


class DFSParams(Params):
    ratio: float = Field(0.5, ge=0, le=1, description="share of each stage's channels the deeper exits keep "
                                                       "training (--dns-ratio); the rest is detached on their path")
    scope: Literal["head", "all"] = Field(
        "head", description="partition the state's head-facing tensors (MSDNet: the coarsest scale, as the code) "
                            "or every tensor")
    kd: bool = Field(False, description="add distillation from the detached last exit (--useKD; off in the script)")
    temperature: float = Field(3.0, gt=0, description="KD softmax temperature T (-T)")
    gamma: float = Field(0.9, ge=0, le=1, description="KD weight for exits 1..K-1 (--gamma)")


def channel_axis(t: torch.Tensor) -> int | None:
    if t.dim() < 2:
        return None
    return -1 if t.dim() == 3 else 1


def reroute(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_plus, x_sub) of one tensor: the deeper path's partly detached copy and the head's input."""
    axis = channel_axis(x)
    if axis is None:
        return x, x
    if ratio >= 1:
        return x, x.detach()
    if ratio <= 0:
        return x.detach(), x
    keep = round(x.shape[axis] * ratio)
    shared, own = torch.split(x, [keep, x.shape[axis] - keep], dim=axis)
    return torch.cat([shared, own.detach()], dim=axis), x


def partition(state, ratio: float, scope: str):
    """(to_head, to_next) of a stage state."""
    if scope == "all" or isinstance(state, torch.Tensor):
        return map_state(lambda t: reroute(t, ratio)[1], state), map_state(lambda t: reroute(t, ratio)[0], state)
    if isinstance(state, (list, tuple)) and state and isinstance(state[-1], torch.Tensor):
        plus, sub = reroute(state[-1], ratio)
        to_head, to_next = list(state), list(state)
        to_head[-1], to_next[-1] = sub, plus
        return (to_head, to_next) if isinstance(state, list) else (tuple(to_head), tuple(to_next))
    if isinstance(state, dict):
        to_head, to_next = dict(state), dict(state)
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                to_next[key], to_head[key] = reroute(t, ratio)
        return to_head, to_next
    return state, state


def dfs_loss(logits: list[torch.Tensor], losses: torch.Tensor, p: DFSParams) -> torch.Tensor:
    """MTLLoss: sum_k CE_k, or with kd the (1 - gamma) CE + gamma soft-target CE for the earlier exits."""
    ce = losses.mean(0)
    if not p.kd:
        return ce.sum()
    T, gamma = p.temperature, p.gamma
    teacher = F.softmax(logits[-1].detach() / T, dim=1)
    objective = ce[-1]
    for k, z in enumerate(logits[:-1]):
        soft = -(teacher * F.log_softmax(z / T, dim=1)).sum(1).mean()
        objective = objective + (1 - gamma) * ce[k] + gamma * soft
    return objective


@METHODS.register("dfs", DFSParams)
class DeepFeatureSurgery(Strategy):
    """Deep Feature Surgery: a channel share of each stage's features detached on the path to deeper exits."""

    distributed = True  # per-sample detaching and a mean over samples: DDP's gradient average is exact

    def boundary(self, k: int, state):
        if k == self.model.num_exits - 1:  # the last stage feeds nothing further (dns_msdnet: no split)
            return state, state
        return partition(state, self.params.ratio, self.params.scope)

    def step(self, x, y, iteration):
        with self.autocast():
            logits = self.model(x, boundary=self.boundary)
            losses = per_exit_ce(logits, y)
            objective = dfs_loss(logits, losses, self.params)
        self.optimizer_step(objective)
        return measure(logits, y, losses, objective)
