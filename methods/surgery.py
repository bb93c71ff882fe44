"""Gradient surgery across exits: the shared machinery of `pcgrad` and `cagrad`.

Each exit's loss CE_k is one task. One forward, then one backward per exit (autograd.grad with
allow_unused) gives every exit's gradient; a parameter that two or more exits reach is *shared* (the
trunk), one that a single exit reaches is that exit's own (its head, and in MSDNet the last block's
parts that only the last head reads). Shared gradients are flattened into G [K, D] (zeros where an exit
does not reach a tensor, as the references' grad2vec fills them) and combined by the subclass's
`combine`; own parameters keep their exit's gradient untouched. Cost: one forward and K backwards
(exit k's backward runs through stages 1..k only) against uniform's one forward and one backward.

Several workers (no DDP reference; the one-process math on the global batch): the forward runs through DDP
without its reducer (`no_sync`; autograd.grad would not trigger it anyway), and every exit's gradients are
averaged over the workers (one all-reduce of K x the reached parameters) before they are combined: each exit's
loss is a mean over samples, so the workers' mean is exit k's gradient on the global batch, and every worker
combines the same G into the same update. (`no_sync` also skips DDP's broadcast of rank 0's BatchNorm buffers:
the other ranks' running statistics are then their own, which nothing reads: training-mode BatchNorm normalises
with the batch, evaluation and checkpoints are rank 0's, and modules a regime freezes in eval mode received rank
0's buffers at their first forward after phase 1, which still went through DDP's reducer.)
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from methods.base import Strategy, measure, per_exit_ce


def exit_gradients(losses: list[torch.Tensor], params: list[torch.Tensor]) -> list[tuple[torch.Tensor | None, ...]]:
    """Per exit k, d losses[k] / d params (None where exit k does not reach a tensor); `losses` are separate
    scalars, one per exit."""
    K = len(losses)
    return [torch.autograd.grad(losses[k], params, retain_graph=k < K - 1, allow_unused=True)
            if losses[k].requires_grad else (None,) * len(params)  # a frozen exit (a regime's frozen last head)
            for k in range(K)]


def surgery_gradients(per_exit: list[tuple[torch.Tensor | None, ...]], params: list[torch.Tensor], combine):
    """The gradient of every parameter: shared ones combined by `combine(G [K, D]) -> [D]`, own ones as
    their exit's. Parameters no exit reaches get None."""
    K = len(per_exit)
    reached = [[k for k in range(K) if per_exit[k][i] is not None] for i in range(len(params))]
    shared = [i for i, r in enumerate(reached) if len(r) >= 2]
    out: list[torch.Tensor | None] = [per_exit[r[0]][i] if len(r) == 1 else None for i, r in enumerate(reached)]
    if shared:
        G = torch.stack([torch.cat([(per_exit[k][i] if per_exit[k][i] is not None else torch.zeros_like(params[i]))
                                    .reshape(-1) for i in shared]) for k in range(K)])
        flat = combine(G)
        offset = 0
        for i in shared:
            n = params[i].numel()
            out[i] = flat[offset:offset + n].view_as(params[i])
            offset += n
    return out


class GradientSurgery(Strategy):
    """One forward, K per-exit backwards, `combine` on the shared parameters, one optimiser step.
    The reported objective is the uniform sum of exit losses (what the combined direction descends)."""

    distributed = True

    def combine(self, G: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def worker_mean_per_exit(self, per_exit):
        """Each exit's gradients, the workers' mean (under DDP; as they are in one process)."""
        if self.group is None:
            return per_exit
        given = [g for grads in per_exit for g in grads if g is not None]
        mean = iter(self.worker_mean(given)) if given else iter(())
        return [tuple(None if g is None else next(mean) for g in grads) for grads in per_exit]

    def step(self, x, y, iteration):
        with self.autocast(), self.model.no_sync() if self.group is not None else nullcontext():
            logits = self.model(x)
            # One scalar per exit, each from its own logits: a stacked [K] tensor would connect every exit's
            # graph to every other's (zero gradients instead of None), and no parameter would look own.
            exit_loss = [F.cross_entropy(z, y) for z in logits]
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Under AMP every exit loss carries the same scale; both combinations are positively homogeneous
        # (combine(s G) = s combine(G)), so the scaler's unscale and inf check still apply as usual.
        per_exit = exit_gradients([self.scaler.scale(loss) for loss in exit_loss], params)
        per_exit = self.worker_mean_per_exit(per_exit)
        grads = surgery_gradients(per_exit, params, self.combine)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            losses = per_exit_ce(logits, y)
        return measure(logits, y, losses, sum(exit_loss))
