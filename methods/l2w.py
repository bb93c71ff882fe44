"""`l2w`: learning to weight samples (L2W-DEN, Han et al. ECCV 2022), as LeapLabTHU/L2W-DEN's `train()`.

Each iteration splits the batch in two halves (A, B) and runs the algorithm twice with the roles swapped:
A trains and B is meta data, then B trains and A is meta data; two backbone steps per iteration. One half:

1. Weights. A weight prediction network (WPN: K -> hidden -> K MLP, ReLU, tanh output) reads each training
   sample's detached per-exit losses (or max-softmax confidences, or both) and outputs t [n, K];
   w = 1 + eps * (t - mean t), the mean per exit over the batch (`row`), per sample over the exits (`col`)
   or over the whole matrix (`mat`). The training objective is sum_k mean_i w_ik * L_ik.
2. Meta step (every `meta_interval` batches of an epoch, at i % interval == 0):
   pseudo update  theta_hat = theta - lr * step(g), g = grad_theta sum_k mean_i w_ik L_ik, with the real
   SGD's current lr, momentum buffer, dampening, nesterov and weight decay (L2W-DEN's MetaSGD, which is
   torch SGD's update: d = g + wd*theta; b = mu*buf + (1-dampening)*d, or b = d before the buffer exists;
   step = d + mu*b with nesterov, else b). theta_hat depends on the WPN parameters phi through w.
   Meta loss on the meta half at theta_hat (`exit_aware`): target exit proportions q_k ~ q^k,
   q = target_p / 20; for k < K in order the floor(n * q_k) most confident (max softmax at exit k) samples
   not yet allocated go to exit k, the last exit takes the rest; L_meta = sum_k mean CE over exit k's
   samples (an empty group adds 0). `uniform` puts every meta sample at every exit (Meta-Weight-Net style).
   One Adam step of the WPN (lr 1e-4, weight decay 1e-4, per-iteration cosine over the run).
3. Real step: w from the just-updated WPN (no grad), one SGD step of the backbone on the weighted loss.

Differences from the reference, none of which changes a number:
- The pseudo update is functional (torch.func.functional_call on the model itself, no copy of the network),
  and the real forward of the training half serves the pseudo step too (same theta, same batch, train-mode
  BatchNorm uses batch statistics in both). BatchNorm running statistics therefore move exactly once per
  real forward, as in the reference, whose pseudo forward ran on a throw-away copy. The meta forward (and
  the extra forwards of `jvp`/`finite_difference`) run in train mode with running-stat tracking switched
  off, so they use batch statistics and touch no buffer.
- Ties in the exit allocation are broken by sample order (stable sort); the reference's unstable sort
  leaves their order unspecified.
- The meta step runs where the batch index within the epoch is a multiple of meta_interval, as the
  reference's `i % meta_interval == 0` (its `i` restarts every epoch).
- An odd batch is split as the reference's `chunk(2)` splits it (ceil(n/2) trains first).

The WPN gradient, `meta_grad`. Since g is linear in w, dL_meta/dw_ik = -(1/n) <a * v, grad_theta L_ik>
with v = grad_theta_hat L_meta and a = lr * c per parameter (c = d step / d g: 1, 1 - dampening once a
momentum buffer exists, times (1 + mu * .) with nesterov; momentum and weight-decay terms do not depend on
w). The chain rule to phi then runs through the normalisation and the WPN by ordinary backprop.
- `exact` (default): reverse over reverse through the differentiable pseudo step, as the reference does.
- `jvp`: the same numbers from one forward-mode pass (dual tensors, torch.autograd.forward_ad; what
  torch.func.jvp computes) of the per-sample losses of the training half along a * v. That pass reuses
  the real forward's conv outputs as primals and takes BatchNorm tangents from the native backward kernel
  (`FastJvp`), so it costs about two forwards.
- `finite_difference`: the directional derivative from two extra forwards at theta +- r * a * v,
  r = fd_radius / ||a * v|| (DARTS-style). An approximation: O(r^2) error, more where ReLU kinks fall
  inside the +-r band (~2 % relative on a tiny test net), plus float round-off.
Recommended: `jvp` (equal to `exact` to float precision, ~25 % faster and lighter: PyTorch's CPU conv double
backward also computes the second-order input and weight gradients that nothing asks for).
Cost per half, in forwards F of the half batch: F (real) + B (pseudo gradient) + F + B (meta half) + ~2F
(jvp) + B (real step), B ~ 1.6F; `benchmarks/l2w_speed.py` prints the figures.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from bench.errors import ConfigError, UsageError
from bench.registry import METHODS, Params
from methods.base import StepOutput, Strategy, combine, measure, per_exit_ce


class L2WParams(Params):
    """Defaults: the L2W-DEN CIFAR setting (eps 0.8, col, meta_interval 1). Preset `l2w-imagenet`."""

    epsilon: float = Field(0.8, ge=0, description="weight perturbation size: w = 1 + eps * (tanh - mean)")
    normalize: Literal["row", "col", "mat"] = Field(
        "col", description="mean removed per exit over the batch (row), per sample (col) or overall (mat)")
    target_p: int = Field(15, ge=1, le=39, description="meta target exit proportions ~ q^k, q = target_p / 20")
    meta_interval: int = Field(1, ge=1, description="meta step at batches i of an epoch with i % interval == 0")
    wpn_input: Literal["loss", "conf", "both"] = Field("loss", description="WPN input per sample (detached)")
    wpn_hidden: int = Field(500, ge=1, description="WPN hidden width")
    wpn_layers: int = Field(1, ge=1, description="WPN hidden layers")
    meta_lr: float = Field(1e-4, gt=0, description="WPN Adam learning rate (cosine over the run)")
    meta_weight_decay: float = Field(1e-4, ge=0, description="WPN Adam weight decay (coupled L2)")
    meta_objective: Literal["exit_aware", "uniform"] = "exit_aware"
    meta_grad: Literal["exact", "jvp", "finite_difference"] = Field(
        "exact", description="how the WPN gradient is computed (finite_difference is approximate)")
    fd_radius: float = Field(0.01, gt=0, description="finite_difference: norm of the parameter perturbation")


class WeightPredictor(nn.Module):
    """L2W-DEN's MLP_tanh: Linear -> ReLU (x layers) -> Linear -> tanh, PyTorch default init."""

    def __init__(self, in_features: int, num_exits: int, hidden: int = 500, layers: int = 1):
        super().__init__()
        dims = [in_features] + [hidden] * layers
        body: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*body, nn.Linear(hidden, num_exits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x))


def target_probs(num_exits: int, target_p: int) -> torch.Tensor:
    """q_k ~ q^k, k = 1..K, q = target_p / 20, normalised; float32 as the reference's calc_target_probs."""
    q = torch.tensor(target_p / 20, dtype=torch.float32)
    probs = torch.exp(torch.log(q) * torch.arange(1, num_exits + 1))
    return probs / probs.sum()


def allocate_exits(confidence: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Exit index per sample from the [n, K] confidences: for k < K in order the floor(n * q_k) most
    confident samples not yet allocated go to exit k, the last exit takes the rest. Ties: sample order."""
    n, K = confidence.shape
    counts = torch.floor(n * probs.float()).long().tolist()  # float32 product, as math.floor(n * tensor)
    exit_of = torch.full((n,), K - 1, dtype=torch.long, device=confidence.device)
    free = torch.ones(n, dtype=torch.bool, device=confidence.device)
    for k in range(K - 1):
        if counts[k] == 0:
            continue
        order = torch.argsort(confidence[:, k], descending=True, stable=True)
        chosen = order[free[order]][: counts[k]]
        exit_of[chosen] = k
        free[chosen] = False
    return exit_of


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def running_stats_frozen(model: nn.Module, norms: list[nn.Module] | None = None):
    """BatchNorm in train mode without touching running_mean/var/num_batches_tracked (batch statistics).
    `norms`: the model's tracking BatchNorm modules, if already known (walking the modules costs time)."""
    norms = batch_norms(model) if norms is None else [m for m in norms if m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class FastJvp:
    """Two shortcuts for the `jvp` pass over the training half; each gives the same numbers as torch's
    forward-mode rules (up to float rounding) for less work.

    - Conv primals. That pass runs the same network at the same theta on the same batch as the real forward
      (train-mode BatchNorm with batch statistics in both), so every conv's primal output is already known:
      recorded in the real forward, only the tangent conv(t_x, W) + conv(x, t_W) (+ t_b) is computed, one
      conv of torch's three saved per layer. A conv whose recorded output was modified in place since, or
      whose input shape differs from the recorded one, computes its primal as usual.
    - BatchNorm with batch statistics. Its Jacobian in the input is symmetric, so the input part of the
      tangent is one call of the native backward kernel; the weight and bias parts are x_hat * t_w + t_b.
      torch's own rule composes ~10 elementwise ops."""

    CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def __init__(self, model: nn.Module):
        self.convs = [m for m in model.modules() if type(m) in self.CONVS and m.padding_mode == "zeros"]
        self.norms = [m for m in model.modules() if type(m) in self.NORMS]
        self.outputs: dict[nn.Module, list[tuple[torch.Tensor, int, torch.Size]]] = {}

    @contextmanager
    def recording(self):
        """Record every conv output (with its version counter and input shape) of the forward run inside."""
        self.outputs = {}

        def keep(module, args, out):
            self.outputs.setdefault(module, []).append((out, out._version, args[0].shape))

        handles = [m.register_forward_hook(keep) for m in self.convs]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def active(self):
        """Inside, forward-mode passes use both shortcuts. The recorded conv outputs are forgotten after."""
        convs = [m for m in self.convs if m in self.outputs]
        for m in convs:
            m._conv_forward = self._conv_tangent(m, self.outputs[m])
        for m in self.norms:
            m.forward = self._norm_tangent(m)
        try:
            yield
        finally:
            for m in convs:
                del m._conv_forward
            for m in self.norms:
                del m.forward
            self.outputs = {}

    @staticmethod
    def _conv_tangent(module: nn.Module, recorded: list[tuple[torch.Tensor, int, torch.Size]]):
        conv = type(module)._conv_forward
        calls = iter(recorded)

        def forward(x, weight, bias):
            out, version, shape = next(calls, (None, None, None))
            x_p, x_t = fwAD.unpack_dual(x)
            w_p, w_t = fwAD.unpack_dual(weight)
            if out is None or out._version != version or x_p.shape != shape:
                return conv(module, x, weight, bias)
            tangent = None if x_t is None else conv(module, x_t, w_p, None)
            if w_t is not None:
                term = conv(module, x_p, w_t, None)
                tangent = term if tangent is None else tangent.add_(term)
            b_t = None if bias is None else fwAD.unpack_dual(bias).tangent
            if b_t is not None:
                view = b_t.view((-1,) + (1,) * (out.dim() - 2))
                tangent = view.expand_as(out).clone() if tangent is None else tangent.add_(view)
            return out if tangent is None else fwAD.make_dual(out, tangent)

        return forward

    @staticmethod
    def _norm_tangent(module: nn.Module):
        def forward(x):
            if not module.training or (module.track_running_stats and module.running_mean is not None):
                return type(module).forward(module, x)  # running statistics in play: torch's own rule
            x_p, x_t = fwAD.unpack_dual(x)
            w_p, w_t = (None, None) if module.weight is None else fwAD.unpack_dual(module.weight)
            b_p, b_t = (None, None) if module.bias is None else fwAD.unpack_dual(module.bias)
            out, mean, invstd = torch.native_batch_norm(x_p, w_p, b_p, None, None, True, 0.0, module.eps)
            if x_t is None and w_t is None and b_t is None:
                return out
            shape = (1, -1) + (1,) * (x_p.dim() - 2)
            if x_t is None:
                tangent = torch.zeros_like(out)
            else:  # J^T t = J t: gamma * invstd * (t - mean(t) - x_hat * mean(t * x_hat))
                tangent = torch.ops.aten.native_batch_norm_backward(
                    x_t, x_p, w_p, None, None, mean, invstd, True, module.eps, [True, False, False])[0]
            if w_t is not None:  # x_hat * t_w = x * (invstd t_w) - mean * (invstd t_w)
                scale = (invstd * w_t).view(shape)
                tangent.addcmul_(x_p, scale).sub_(mean.view(shape) * scale)
            if b_t is not None:
                tangent.add_(b_t.view(shape))
            return fwAD.make_dual(out, tangent)

        return forward


@dataclass
class _SGDGroup:
    """Parameters that share SGD settings and momentum-buffer presence (foreach ops over the whole group)."""

    names: list[str]
    params: list[nn.Parameter]
    buffers: list[torch.Tensor] | None
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool

    def pseudo_step(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """theta - lr * step(grad): torch SGD's update, differentiable in `grads`."""
        theta = [p.detach() for p in self.params]
        d = torch._foreach_add(grads, theta, alpha=self.weight_decay) if self.weight_decay else list(grads)
        if self.buffers is not None:
            b = torch._foreach_add(torch._foreach_mul(self.buffers, self.momentum), d, alpha=1 - self.dampening)
        else:
            b = d
        step = torch._foreach_add(d, b, alpha=self.momentum) if self.nesterov else b
        return torch._foreach_add(theta, step, alpha=-self.lr)

    def only(self, keep: list[bool]) -> _SGDGroup | None:
        """The members flagged in `keep` (torch SGD leaves a parameter without a gradient untouched)."""
        if not any(keep):
            return None
        pick = [i for i, k in enumerate(keep) if k]
        return _SGDGroup([self.names[i] for i in pick], [self.params[i] for i in pick],
                         None if self.buffers is None else [self.buffers[i] for i in pick], self.lr, self.momentum,
                         self.dampening, self.weight_decay, self.nesterov)

    def grad_scale(self) -> float:
        """-d theta_hat / d grad = lr * c."""
        c = (1 - self.dampening) if self.buffers is not None else 1.0
        return self.lr * ((1 + self.momentum * c) if self.nesterov else c)


@METHODS.register("l2w", L2WParams)
class L2W(Strategy):
    """Meta-learned per-sample, per-exit loss weights (L2W-DEN) with a functional pseudo update."""

    # Several workers as L2W-DEN's main_imagenet_DDP.py: the real steps through DDP; the pseudo step is this
    # rank's own (its gradients on its half batch, never through DDP); the WPN's meta-gradient is averaged over
    # the ranks; weights normalised and exits allocated per rank.
    distributed = True
    sync_bn_refused = "differentiates twice through BatchNorm, which SyncBatchNorm cannot"

    def __init__(self, params: L2WParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        if self.amp:
            raise ConfigError("method l2w: amp is not supported (the meta step differentiates through an SGD "
                              "step); set amp: false")
        if not isinstance(optimizer, torch.optim.SGD):
            raise ConfigError(f"method l2w: the pseudo update mirrors SGD, got optimizer "
                              f"{type(optimizer).__name__}; use optim.name: sgd")
        K = model.num_exits
        ref = next(model.parameters())
        self.wpn = WeightPredictor(2 * K if params.wpn_input == "both" else K, K, params.wpn_hidden,
                                   params.wpn_layers).to(device=ref.device, dtype=ref.dtype)
        self.wpn_optimizer = torch.optim.Adam(self.wpn.parameters(), lr=params.meta_lr,
                                              weight_decay=params.meta_weight_decay)
        total = max(1, self.total_steps)
        self.wpn_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.wpn_optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
        self.probs = target_probs(K, params.target_p)
        self.net = model  # evaluated functionally at pseudo parameters: never the DDP wrapper (see distribute)
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._norms = batch_norms(model)
        self._fast_jvp = FastJvp(model)
        # functional_call re-derives weight tying on every call unless told there is none.
        self._tied = len(list(model.named_parameters(remove_duplicate=False))) != len(self._names)

    # -- the pieces --------------------------------------------------------------------------------------
    def wpn_features(self, logits: list[torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
        kind = self.params.wpn_input
        if kind == "loss":
            return losses.detach()
        with torch.no_grad():
            conf = torch.stack([F.softmax(z, dim=1).amax(1) for z in logits], dim=1)
        return conf if kind == "conf" else torch.cat([losses.detach(), conf], dim=1)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """[n, K] loss weights w = 1 + eps * (t - mean t)."""
        t = self.wpn(features)
        mode = self.params.normalize
        t = t - (t.mean(0, keepdim=True) if mode == "row" else t.mean(1, keepdim=True) if mode == "col" else t.mean())
        return 1 + self.params.epsilon * t

    def sgd_groups(self) -> list[_SGDGroup]:
        """The trainable parameters grouped by SGD settings (read now: the current lr) and by whether their
        momentum buffer exists yet (torch SGD creates it at a parameter's first update)."""
        groups = []
        for group in self.optimizer.param_groups:
            if group.get("maximize"):
                raise ConfigError("method l2w: SGD with maximize=True is not supported")
            momentum = float(group["momentum"])
            split: dict[bool, list] = {False: [], True: []}
            for p in group["params"]:
                if p.requires_grad:
                    buf = self.optimizer.state.get(p, {}).get("momentum_buffer") if momentum else None
                    split[buf is not None].append((p, buf))
            for has_buffer, members in split.items():
                if members:
                    groups.append(_SGDGroup(
                        [self._names[id(p)] for p, _ in members], [p for p, _ in members],
                        [b for _, b in members] if has_buffer else None, float(group["lr"]), momentum,
                        float(group["dampening"]), float(group["weight_decay"]), bool(group["nesterov"])))
        return groups

    def meta_loss(self, theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The meta objective of the network at parameters `theta` on the meta half."""
        logits = self._call_at(theta, x)
        losses = per_exit_ce(logits, y)
        if self.params.meta_objective == "uniform":
            return losses.mean(0).sum()
        with torch.no_grad():
            conf = torch.stack([F.softmax(z, dim=1).amax(1) for z in logits], dim=1)
            exit_of = allocate_exits(conf, self.probs)
        total = losses.new_zeros(())
        for k in range(losses.shape[1]):
            chosen = exit_of == k
            if chosen.any():
                total = total + losses[chosen, k].mean()
        return total

    def _call_at(self, theta: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """The model's exits at parameters `theta`, train mode, running statistics untouched."""
        with running_stats_frozen(self.net, self._norms):
            return functional_call(self.net, theta, (x,), tie_weights=self._tied)

    def _train_losses_at(self, theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_exit_ce(self._call_at(theta, x), y)

    def wpn_gradient(self, features, losses, x_tr, y_tr, x_me, y_me) -> tuple[list[torch.Tensor], float]:
        """d L_meta / d phi for the training half (its per-exit losses `losses` from the real forward, whose
        graph is kept for the real step) and the meta half. Returns (gradients per WPN parameter, L_meta)."""
        groups = self.sgd_groups()
        names = [name for group in groups for name in group.names]
        params = [p for group in groups for p in group.params]
        wpn_params = list(self.wpn.parameters())
        w = self.weights(features)
        n = losses.shape[0]
        if self.params.meta_grad == "exact":
            g = torch.autograd.grad((w * losses).mean(0).sum(), params, create_graph=True, allow_unused=True)
            groups, names, params, g = self._drop_unused(groups, g)
            theta_hat = dict(zip(names, self._pseudo_step(groups, g)))
            meta = self.meta_loss(theta_hat, x_me, y_me)
            grads = torch.autograd.grad(meta, wpn_params, allow_unused=True)
        else:
            g = torch.autograd.grad((w.detach() * losses).mean(0).sum(), params, retain_graph=True,
                                    allow_unused=True)
            groups, names, params, g = self._drop_unused(groups, g)
            with torch.no_grad():
                theta_hat = dict(zip(names, [t.requires_grad_() for t in self._pseudo_step(groups, g)]))
            del g
            meta = self.meta_loss(theta_hat, x_me, y_me)
            v = torch.autograd.grad(meta, list(theta_hat.values()), allow_unused=True)
            v = [torch.zeros_like(t) if vi is None else vi for t, vi in zip(theta_hat.values(), v)]
            del theta_hat
            direction, start = {}, 0
            for group in groups:  # a * v, a = lr * c per group
                chunk = torch._foreach_mul(list(v[start:start + len(group.params)]), group.grad_scale())
                direction.update(zip(group.names, chunk))
                start += len(group.params)
            del v
            theta = {name: p.detach() for name, p in zip(names, params)}
            if self.params.meta_grad == "jvp":
                d_losses = self._jvp(theta, direction, x_tr, y_tr)
            else:
                d_losses = self._finite_difference(theta, direction, x_tr, y_tr)
            grads = torch.autograd.grad(w, wpn_params, grad_outputs=-d_losses / n, allow_unused=True)
        grads = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(wpn_params, grads)]
        return grads, float(meta.detach())

    @staticmethod
    def _drop_unused(groups: list[_SGDGroup], grads):
        """Parameters the training loss does not reach get no gradient, and SGD does not move them."""
        if all(gi is not None for gi in grads):
            return groups, [n for grp in groups for n in grp.names], [p for grp in groups for p in grp.params], grads
        kept, start = [], 0
        for group in groups:
            sub = group.only([gi is not None for gi in grads[start:start + len(group.params)]])
            start += len(group.params)
            if sub is not None:
                kept.append(sub)
        return (kept, [n for grp in kept for n in grp.names], [p for grp in kept for p in grp.params],
                [gi for gi in grads if gi is not None])

    @staticmethod
    def _pseudo_step(groups: list[_SGDGroup], grads) -> list[torch.Tensor]:
        out, start = [], 0
        for group in groups:
            out += group.pseudo_step(list(grads[start:start + len(group.params)]))
            start += len(group.params)
        return out

    @torch.no_grad()
    def _jvp(self, theta, direction, x, y) -> torch.Tensor:
        """Forward-mode derivative of the per-sample losses along `direction`. Dual tensors
        (torch.autograd.forward_ad) rather than torch.func.jvp: same numbers, ~25 % less time here."""
        with fwAD.dual_level(), self._fast_jvp.active():
            duals = {k: fwAD.make_dual(theta[k], direction[k]) for k in theta}
            return fwAD.unpack_dual(self._train_losses_at(duals, x, y)).tangent

    @torch.no_grad()
    def _finite_difference(self, theta, direction, x, y) -> torch.Tensor:
        keys, d = list(direction), list(direction.values())
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(d)).double()))
        if norm == 0:
            return torch.zeros_like(self._train_losses_at(theta, x, y))
        r = self.params.fd_radius / norm
        base = [theta[k] for k in keys]
        plus = self._train_losses_at(dict(zip(keys, torch._foreach_add(base, d, alpha=r))), x, y)
        minus = self._train_losses_at(dict(zip(keys, torch._foreach_add(base, d, alpha=-r))), x, y)
        return (plus - minus) / (2 * r)

    def meta_update(self, features, losses, x_tr, y_tr, x_me, y_me) -> float:
        grads, meta = self.wpn_gradient(features, losses, x_tr, y_tr, x_me, y_me)
        grads = self.worker_mean(list(grads))  # several workers: the ranks' mean, as DDP's reducer on a wrapped WPN
        for p, g in zip(self.wpn.parameters(), grads):
            p.grad = g
        self.wpn_optimizer.step()
        self.wpn_optimizer.zero_grad(set_to_none=True)
        return meta

    def distribute(self, model, group):
        """L2W-DEN's DDP: the backbone's real steps through `model` (DDP), the pseudo step on `self.net`
        with this rank's gradients only, the WPN identical on every rank and its meta-gradient the ranks' mean
        (what DDP's reducer does to a wrapped WPN; the WPN's gradient comes from autograd.grad, which DDP
        would not reduce)."""
        super().distribute(model, group)
        group.broadcast(self.wpn)

    # -- one step ----------------------------------------------------------------------------------------
    def _half(self, x_tr, y_tr, x_me, y_me, meta_step: bool) -> StepOutput:
        record = meta_step and self.params.meta_grad == "jvp"  # conv outputs for the jvp pass (FastJvp)
        with self._fast_jvp.recording() if record else nullcontext():
            logits = self.model(x_tr)  # the one real forward of this half: BN running stats move here only
        losses = per_exit_ce(logits, y_tr)
        features = self.wpn_features(logits, losses)
        extras = {}
        if meta_step:
            extras["meta_loss"] = self.meta_update(features, losses, x_tr, y_tr, x_me, y_me)
        with torch.no_grad():
            w = self.weights(features)
        objective = (w * losses).mean(0).sum()
        self.optimizer_step(objective)
        out = measure(logits, y_tr, losses, objective)
        out.extras = extras
        return out

    def step(self, x, y, iteration):
        if x.shape[0] < 2:
            raise UsageError(f"method l2w: a batch of {x.shape[0]} sample cannot be split into a training half "
                             f"and a meta half; use batch_size >= 2 (even)")
        (x1, x2), (y1, y2) = x.chunk(2), y.chunk(2)
        meta_step = (iteration % self.steps_per_epoch) % self.params.meta_interval == 0
        outputs = [self._half(x1, y1, x2, y2, meta_step), self._half(x2, y2, x1, y1, meta_step)]
        self.wpn_scheduler.step()
        return combine(outputs)

    def state_dict(self):
        return {**super().state_dict(), "wpn": self.wpn.state_dict(),
                "wpn_optimizer": self.wpn_optimizer.state_dict(), "wpn_scheduler": self.wpn_scheduler.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.wpn.load_state_dict(state["wpn"])
        self.wpn_optimizer.load_state_dict(state["wpn_optimizer"])
        self.wpn_scheduler.load_state_dict(state["wpn_scheduler"])


METHODS.add_preset("l2w-imagenet", "l2w", doc="L2W-DEN ImageNet: eps 0.3, mat, meta_interval 100",
                   epsilon=0.3, normalize="mat", meta_interval=100)
