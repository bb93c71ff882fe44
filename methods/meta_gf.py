"""`meta-gf`: meta gradient fusion (Sun, Li and Xu, ECCV 2022; SYVAE/MetaGF `M5main_GF.py`).

An epoch-level method. Every epoch, from the current model theta:
1. K copies, copy k trained one epoch on CE_k + aux_scale * sum_{j != k} c_j CE_j (`train_minibatch`
   with --usingsdn 0, the MSDNet scripts' setting: aux_scale 0.1, c = [1, 1, .6, .6, .75, .9, 1]),
   with SGD at the trial's lr, momentum and weight decay.
2. Fusion per parameter tensor p over the exits whose loss reaches p (`ValidNodeslist`: exit k's
   backward leaves p.grad set): theta_p = sum_k s(a_kp) theta_kp / sum_k s(a_kp), s the sigmoid,
   a initialised to 1. So head k is copy k's head, and stage s mixes copies s..K.
3. One pass over the training loader (`eval_validate`): per batch, the fused model (train mode) is scored
   with the SDN-style loss sum_{k<K} min(C_k, 0.01 + e C_k / E) CE_k + CE_K (C = [.15, .3, .45, .6, .75,
   .9], e the 0-based epoch of E) and Adam (lr 0.1) steps the a; the BatchNorm statistics run on through
   the pass. The model becomes the last batch's fused weights (the a before that batch's step) with the
   pass's final statistics. As under the reference's PyTorch 1.x, zero_grad left zero gradients, so one
   more Adam step with zero gradients follows the pass.
4. a <- (1 - ema) * a + ema * a_before_the_pass (ema 0.9); the meta lr is x0.1 from half the epochs.

Cost: K copy updates per batch (each a full forward and backward) plus the fusion pass (a forward and a
backward per batch), about K + 1 epochs of uniform per epoch, and K extra copies of the weights in memory.

How this maps onto the engine: `step` trains the K copies on the engine's batch, one after the other
(the reference trains them one after the other over the whole epoch, each on its own shuffle: the same
updates on the same distribution, interleaved); `end_epoch` runs steps 2-4. Each copy has its own SGD
momentum, kept across epochs (the reference's single SGD carries one momentum from copy to copy); the
copies start each epoch from the model, parameters and statistics, and the fusion pass starts from the
last copy's statistics (the reference's run of copies ends with them). Two places where the reference as
run differs from what it writes, and this follows what it writes: its EMA rebinds the a to fresh tensors
that Adam no longer holds and that do not require grad, so the a stop learning after the first epoch; and
its MultiStepLR is built with last_epoch=epochs, so the x0.1 milestone is never reached
(`meta_lr_drop: null` reproduces the latter).

Several workers, as the reference's multi-GPU runs (`M5main_GF.py`: nn.DataParallel, one process whose losses
see the whole gathered batch): the model itself is never trained by a backward, so it stays outside DDP. Each
copy's gradients and the fusion weights' gradients are the workers' mean (every loss is a mean over samples), so
copies, fusion weights and fused model are the same on every worker; each worker's copies and fusion pass move
their BatchNorm statistics on its share; the model is rank 0's at each epoch's start (DDP's convention for
buffers: a regime's phase 1 leaves each worker its own statistics) and after each fusion pass. With sync_bn the
copies use SyncBatchNorm too.

The strategy state (checkpoint) holds the a, Adam's state and every copy's momentum; the copies' weights
need not be saved, since each epoch rebuilds them from the model.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from bench.errors import ConfigError
from bench.registry import METHODS, Params
from methods.base import StepOutput, Strategy, per_exit_ce

AUX_WEIGHTS = [1.0, 1.0, 0.6, 0.6, 0.75, 0.9, 1.0]  # train_minibatch's per-exit c_j (7 MSDNet blocks)
SDN_COEFFS = [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]  # eval_validate's max_coeffs C_k (exits 1..K-1)


class MetaGFParams(Params):
    aux_scale: float = Field(0.1, ge=0, description="weight of the other exits in a copy's loss (--auxiliarylr)")
    aux_weights: list[float] | None = Field(None, description="c_j per exit (default the reference's, K <= 7)")
    meta_coeffs: list[float] | None = Field(None, description="C_k of the fusion loss, exits 1..K-1 (default "
                                                              "the SDN's 0.15..0.9, K <= 7)")
    meta_lr: float = Field(0.1, gt=0, description="Adam lr of the fusion weights (--Metalr)")
    meta_lr_drop: float | None = Field(0.5, gt=0, le=1, description="fraction of the epochs after which the "
                                                                    "meta lr is x0.1 (null: never)")
    ema: float = Field(0.9, ge=0, le=1, description="weight of the previous fusion weights (--EMAoldmomentum)")


def fuse(thetas: torch.Tensor, alpha: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """thetas [K, ...] the copies' values of one tensor, alpha [K], reach [K] bool: the sigmoid-weighted
    mean over the copies whose exit reaches the tensor."""
    s = torch.sigmoid(alpha) * reach
    return (s.view(-1, *[1] * (thetas.dim() - 1)) * thetas).sum(0) / s.sum()


def fusion_loss(logits: list[torch.Tensor], y: torch.Tensor, coeffs: list[float], epoch: int, epochs: int):
    """eval_validate's loss: sum_{k<K} min(C_k, 0.01 + epoch * C_k / epochs) CE_k + CE_K."""
    ce = torch.stack([torch.nn.functional.cross_entropy(z, y) for z in logits])
    tau = [min(c, 0.01 + epoch * c / epochs) for c in coeffs]
    return (ce[:-1] * torch.tensor(tau, dtype=ce.dtype, device=ce.device)).sum() + ce[-1]


def _values(name: str, given: list[float] | None, default: list[float], n: int) -> list[float]:
    if given is None:
        if n > len(default):
            raise ConfigError(f"method.{name}: the reference's defaults cover {len(default)} values, this backbone "
                              f"needs {n}; give method.{name} as a list of {n} numbers")
        return default[:n]
    if len(given) != n:
        raise ConfigError(f"method.{name}: this backbone needs {n} values, got {len(given)}")
    return list(given)


@METHODS.register("meta-gf", MetaGFParams)
class MetaGF(Strategy):
    """Meta-GF: K per-exit copies trained each epoch, fused per tensor with meta-learned sigmoid weights."""

    distributed = True

    def __init__(self, params: MetaGFParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        K = model.num_exits
        self.aux_weights = _values("aux_weights", params.aux_weights, AUX_WEIGHTS, K)
        self.meta_coeffs = _values("meta_coeffs", params.meta_coeffs, SDN_COEFFS, K - 1)
        self.epochs = max(self.total_steps // self.steps_per_epoch, 1)
        self.names = [n for n, _ in model.named_parameters()]
        self.copies = [copy.deepcopy(model) for _ in range(K)]
        group = optimizer.param_groups[0]
        self.copy_optimizers = [
            torch.optim.SGD(c.parameters(), lr=group["lr"], momentum=group.get("momentum", 0.0),
                            weight_decay=group.get("weight_decay", 0.0), nesterov=group.get("nesterov", False))
            for c in self.copies]
        self.alpha = torch.ones(K, len(self.names), device=self.device, requires_grad=True)
        self.meta_optimizer = torch.optim.Adam([self.alpha], lr=params.meta_lr)
        self.reach: torch.Tensor | None = None  # [K, P] bool, from the graph at every epoch's first batch

    def distribute(self, model, group):
        """Only the copies and the fusion weights learn by gradient: the model stays the plain network."""
        super().distribute(model.module, group)
        if group.sync_bn:  # in place, as the model's: each copy's optimiser keeps its parameters
            self.copies = [torch.nn.SyncBatchNorm.convert_sync_batchnorm(c) for c in self.copies]

    def reach_mask(self, x: torch.Tensor) -> torch.Tensor:
        """[K, P]: does exit k's output reach parameter p (the reference's ValidNodeslist)? Eval mode, so no
        BatchNorm statistics move (the graph is the same as in train mode). A frozen parameter (requires_grad
        off, e.g. a training regime's frozen backbone) is reached by none, so fusion leaves it as it is."""
        modes = [m.training for m in self.model.modules()]
        self.model.eval()
        params = list(self.model.parameters())
        trainable = [p for p in params if p.requires_grad]
        with torch.enable_grad():
            logits = self.model(x[:2])
            rows = []
            for z in logits:
                if not z.requires_grad:  # everything under this exit is frozen
                    rows.append([False] * len(params))
                    continue
                grads = iter(torch.autograd.grad(z.sum(), trainable, retain_graph=True, allow_unused=True))
                rows.append([p.requires_grad and next(grads) is not None for p in params])
        for m, mode in zip(self.model.modules(), modes):
            m.training = mode
        return torch.tensor(rows, device=self.device)

    def start_epoch(self, x: torch.Tensor) -> None:
        """The copies start from the model: weights, statistics, which parameters train and which modules are
        in train mode (as the engine or a training regime set them for this epoch)."""
        if self.group is not None:  # rank 0's model, as DDP's forward broadcasts its buffers (a regime's phase 1
            self.group.broadcast(self.model)  # leaves each rank its own BatchNorm statistics)
        self.reach = self.reach_mask(x)
        for c in self.copies:
            c.load_state_dict(self.model.state_dict())
            for pc, pm in zip(c.parameters(), self.model.parameters()):
                pc.requires_grad_(pm.requires_grad)
            for mc, mm in zip(c.modules(), self.model.modules()):
                mc.training = mm.training

    def step(self, x, y, iteration):
        if iteration % self.steps_per_epoch == 0 or self.reach is None:
            self.start_epoch(x)
        lr = self.optimizer.param_groups[0]["lr"]  # the engine's schedule drives the copies
        K = len(self.copies)
        objectives, exit_losses, exit_correct = [], torch.zeros(K), torch.zeros(K)
        for k, (model_k, opt_k) in enumerate(zip(self.copies, self.copy_optimizers)):
            for group in opt_k.param_groups:
                group["lr"] = lr
            with self.autocast():
                logits = model_k(x)
                ce = per_exit_ce(logits, y).mean(0)
                aux = sum(self.aux_weights[j] * ce[j] for j in range(K) if j != k)
                objective = ce[k] + self.params.aux_scale * aux
            opt_k.zero_grad(set_to_none=True)
            self.scaler.scale(objective).backward()
            self.average_gradients(model_k.parameters())
            self.scaler.step(opt_k)
            objectives.append(float(objective.detach()))
            exit_losses[k] = float(ce[k].detach())  # exit k as its own copy trains it (fusion keeps that head)
            exit_correct[k] = float((logits[k].detach().argmax(1) == y).sum())
        self.scaler.update()
        # Only the copies train. With its gradients cleared (a regime's phase 1 may have left some) the engine's
        # optimizer steps nothing, and the LR scheduler's "optimizer.step() before scheduler.step()" check holds.
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.step()
        return StepOutput(sum(objectives) / K, exit_losses, exit_correct, int(y.numel()))

    def meta_lr(self, epoch: int) -> float:
        drop = self.params.meta_lr_drop
        return self.params.meta_lr * (0.1 if drop is not None and epoch >= int(drop * self.epochs) else 1.0)

    def stacked(self) -> list[torch.Tensor]:
        """Per parameter tensor, the copies' values stacked [K, ...]."""
        per_copy = [dict(c.named_parameters()) for c in self.copies]
        return [torch.stack([p[n].detach() for p in per_copy]) for n in self.names]

    def fused(self, thetas: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fused parameters (differentiable in alpha); a tensor no exit reaches keeps the model's value."""
        current = dict(self.model.named_parameters())
        return {n: fuse(t, self.alpha[:, i], self.reach[:, i]) if self.reach[:, i].any() else current[n].detach()
                for i, (n, t) in enumerate(zip(self.names, thetas))}

    def meta_step(self, thetas: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, epoch: int):
        """One batch of the fusion pass: fused forward (train mode, statistics updated), loss, Adam step.
        Returns the fused parameters used (before the step) and the loss."""
        fused = self.fused(thetas)
        logits = torch.func.functional_call(self.model, fused, (x,))
        loss = fusion_loss(logits, y, self.meta_coeffs, epoch, self.epochs)
        self.meta_optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.average_gradients([self.alpha])
        self.meta_optimizer.step()
        return {n: t.detach() for n, t in fused.items()}, float(loss.detach())

    def end_epoch(self, epoch: int, loader) -> None:
        if self.reach is None:  # no step yet (no copy trained): nothing to fuse
            return
        for group in self.meta_optimizer.param_groups:
            group["lr"] = self.meta_lr(epoch)
        before = self.alpha.detach().clone()
        thetas = self.stacked()
        with torch.no_grad():  # the pass runs in the epoch's mode (train), as the reference's does
            for b, b_last in zip(self.model.buffers(), self.copies[-1].buffers()):
                b.copy_(b_last)
        fused = None
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            fused, _ = self.meta_step(thetas, x, y, epoch)
        self.meta_optimizer.zero_grad(set_to_none=False)  # the reference's trailing step on zero gradients
        self.meta_optimizer.step()
        with torch.no_grad():
            self.alpha.mul_(1 - self.params.ema).add_(self.params.ema * before)
            if fused is not None:
                for n, p in self.model.named_parameters():
                    p.copy_(fused[n])
        if self.group is not None:  # the pass's statistics: rank 0's on every worker
            self.group.broadcast(self.model)

    def state_dict(self):
        return {**super().state_dict(), "alpha": self.alpha.detach().clone(),
                "meta_optimizer": self.meta_optimizer.state_dict(),
                "copy_optimizers": [o.state_dict() for o in self.copy_optimizers]}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        with torch.no_grad():
            self.alpha.copy_(state["alpha"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        for o, s in zip(self.copy_optimizers, state["copy_optimizers"]):
            o.load_state_dict(s)
