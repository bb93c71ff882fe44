"""`ztw`: Zero Time Waste (Wolczyk et al., NeurIPS 2021; gmum/Zero-Time-Waste, ztw_cv).

Two stages, both inside one trial; the readout (cascade + ensembles) belongs to the strategy.

1. Cascading connections (`architectures/early_exits/ztw.py` ZTWCascading, `heads.py` ConvCascadingHead):
   head k >= 2 concatenates LayerNorm(sg(o_{k-1})) to its pooled features before its final Linear, o_{k-1}
   being exit k-1's (cascaded) logits, detached (`detach=True`, `layer_norm=True` are the defaults). A Linear
   over [features, c] is the raw head's logits plus a linear map of c, so here

       o_1 = f_1,   o_k = f_k + W_k LayerNorm(sg(o_{k-1}))      (f_k: the backbone's raw exit logits)

   with W_k (C x C, no bias: the head's bias already is in f_k) and the LayerNorm in the readout. Trained
   with the exits' cross-entropy averaged over the exits (methods/early_exit.py: `sum(losses) / len(losses)`).
2. Geometric ensembles (ZTWEnsembling, GeometricWeightedEnsemble), fitted on the training split with
   everything before them frozen (`with_backbone=False`: no gradient, BatchNorm statistics frozen in eval
   mode, as `train('without_backbone')`):

       e_k = (1/k) sum_{j<=k} exp(w_kj) * log_softmax(o_j) + b_k,   w_kj ~ N(0, 0.01^2), b_k = 0 at start

   trained with the ensembles' cross-entropy averaged over the exits, by Adam (lr 1e-3, weight decay 0:
   the ensembling runs of ztw_efficientnet_v2.py / ztw_convnext.py / ztw_vit.py / ztw_swin_v2.py) with a
   per-iteration cosine over the stage (the scripts' `scheduler_class = 'cosine'`). Exit k reports e_k.

The stages split the trial's epochs: the last round(ensemble_fraction * epochs) (at least 1) fit the
ensembles (default 0.1: the reference's scripts train the ensembles 2 epochs after 15 of heads; 2 of a
20-epoch trial). Until then the ensembles sit at their initial weights (about the plain mean of the
log-probabilities), which is what per-epoch validation accuracy reports.

Where this differs from the reference, and why: the reference attaches heads to a pretrained backbone and
trains only the heads (Adam lr 5e-4, weight decay 0.1); here stage 1 trains the backbone, its heads and the
cascade weights together with the trial's optimiser and schedule (the cascade weights are extra parameter
groups of it, as they are part of the head's Linear in the reference), like every other strategy of the
bench. The reference leaves the pretrained backbone's own classifier outside the cascade and ensembles;
here every exit, the last included, is a trained head and gets both. W_k starts as nn.Linear(C, C) does.
Readout cost per exit: k C for the ensemble, plus C^2 + 5 C for the cascade from exit 2 on.

Several workers, as the reference's multi-GPU runs (HF Accelerate's `prepare` wraps the whole early-exit model,
cascade heads and ensembles included, in DDP): both stages' objectives are means over samples; the model's
gradients are DDP's mean, the readout's (cascade, ensembles; outside the DDP wrapper here) the workers' mean by
hand, and the readout starts as rank 0's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bench.errors import ConfigError
from bench.readout import Readout
from bench.registry import METHODS, Params
from methods.base import Strategy, measure, per_exit_ce


class ZTWParams(Params):
    ensemble_fraction: float = Field(0.1, gt=0, lt=1, description="share of the epochs fitting the ensembles "
                                     "(last ones; reference: 2 after 15)")
    ensemble_lr: float = Field(1e-3, gt=0, description="Adam lr of the ensembles (reference 1e-3, cosine)")
    ensemble_weight_decay: float = Field(0.0, ge=0, description="Adam weight decay of the ensembles (reference 0)")
    layer_norm: bool = Field(True, description="LayerNorm on the previous exit's logits (reference default)")


class ZTWReadout(Readout):
    """Cascade o_k = f_k + W_k LN(sg(o_{k-1})), then the geometric ensemble e_k of log_softmax(o_1..o_k)."""

    def __init__(self, num_exits: int, num_classes: int, layer_norm: bool = True):
        super().__init__(num_exits, num_classes)
        K, C = num_exits, num_classes
        self.layer_norm = layer_norm
        self.norms = nn.ModuleList(nn.LayerNorm(C) if layer_norm else nn.Identity() for _ in range(K - 1))
        self.cascade = nn.ModuleList(nn.Linear(C, C, bias=False) for _ in range(K - 1))
        self.ensemble_weights = nn.ParameterList(nn.Parameter(torch.randn(k + 1) * 0.01) for k in range(K))
        self.ensemble_bias = nn.Parameter(torch.zeros(K, C))

    def cascade_exit(self, k: int, logits: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        if k == 0:
            return logits
        return logits + self.cascade[k - 1](self.norms[k - 1](previous.detach()))

    def ensemble_exit(self, k: int, log_probs: list[torch.Tensor]) -> torch.Tensor:
        weights = self.ensemble_weights[k].exp()
        return (torch.stack(log_probs, 1) * weights[None, :, None]).mean(1) + self.ensemble_bias[k]

    def exit(self, k, logits, carry):
        previous, log_probs = carry if carry is not None else (None, [])
        cascaded = self.cascade_exit(k, logits, previous)
        log_probs = [*log_probs, F.log_softmax(cascaded, dim=-1)]
        return self.ensemble_exit(k, log_probs), (cascaded, log_probs)

    def cascaded(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """o_1..o_K (stage 1's outputs)."""
        out: list[torch.Tensor] = []
        for k, z in enumerate(logits):
            out.append(self.cascade_exit(k, z, out[-1] if out else None))
        return out

    def ensembles(self, cascaded: list[torch.Tensor]) -> list[torch.Tensor]:
        """e_1..e_K from o_1..o_K (stage 2's outputs)."""
        log_probs = [F.log_softmax(o, dim=-1) for o in cascaded]
        return [self.ensemble_exit(k, log_probs[:k + 1]) for k in range(len(cascaded))]

    def cascade_parameters(self) -> list[nn.Parameter]:
        return [*self.norms.parameters(), *self.cascade.parameters()]

    def ensemble_parameters(self) -> list[nn.Parameter]:
        return [*self.ensemble_weights, self.ensemble_bias]

    def exit_macs(self):
        C = self.num_classes
        cascade = C * C + (5 * C if self.layer_norm else 0)  # Linear; affine LayerNorm as fvcore counts it
        return [(k + 1) * C + (cascade if k else 0) for k in range(self.num_exits)]


@METHODS.register("ztw", ZTWParams)
class ZeroTimeWaste(Strategy):
    """Cascading exits trained with CE, then per-exit geometric ensembles fitted on a frozen network."""

    distributed = True

    @classmethod
    def build_readout(cls, params, num_exits, num_classes):
        return ZTWReadout(num_exits, num_classes, params.layer_norm)

    def __init__(self, params: ZTWParams, model, optimizer, **kw):
        super().__init__(params, model, optimizer, **kw)
        if not isinstance(self.readout, ZTWReadout):
            raise TypeError("method ztw needs its readout: pass readout=build_readout(...)")
        epochs = self.total_steps // self.steps_per_epoch
        self.ensemble_epochs = max(1, round(params.ensemble_fraction * epochs))
        if epochs - self.ensemble_epochs < 1:
            raise ConfigError(f"method ztw: {epochs} epoch(s) leave none for stage 1 after "
                              f"{self.ensemble_epochs} ensemble epoch(s); use epochs >= 2")
        self.ensemble_start = (epochs - self.ensemble_epochs) * self.steps_per_epoch  # first stage-2 iteration
        if self.readout.cascade_parameters():
            # Part of head k's Linear in the reference: same optimiser, settings and schedule as the heads.
            optimizer.add_param_group({"params": self.readout.cascade_parameters()})
        self.ensemble_optimizer = torch.optim.Adam(self.readout.ensemble_parameters(), lr=params.ensemble_lr,
                                                   weight_decay=params.ensemble_weight_decay)

    def step(self, x, y, iteration):
        if iteration < self.ensemble_start:
            with self.autocast():
                outputs = self.readout.cascaded(self.model(x))
                losses = per_exit_ce(outputs, y)
                objective = losses.mean(0).mean()
            self.optimizer_step(objective, outside=self.readout.cascade_parameters())
            return measure(outputs, y, losses, objective)
        # Stage 2: backbone, heads and cascade frozen (eval mode: BatchNorm statistics stay), ensembles learn.
        self.model.eval()
        with torch.no_grad():
            dtype = self.readout.ensemble_bias.dtype  # the ensembles' own precision, whatever AMP left
            cascaded = [o.to(dtype) for o in self.readout.cascaded(self.model(x))]
        outputs = self.readout.ensembles(cascaded)
        losses = per_exit_ce(outputs, y)
        objective = losses.mean(0).mean()
        t = (iteration - self.ensemble_start) / (self.total_steps - self.ensemble_start)
        for group in self.ensemble_optimizer.param_groups:
            group["lr"] = self.params.ensemble_lr * 0.5 * (1 + math.cos(math.pi * t))
        self.ensemble_optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.average_gradients(self.readout.ensemble_parameters())
        self.ensemble_optimizer.step()
        return measure(outputs, y, losses, objective)

    def state_dict(self):
        return {**super().state_dict(), "ensemble_optimizer": self.ensemble_optimizer.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "ensemble_optimizer" in state:
            self.ensemble_optimizer.load_state_dict(state["ensemble_optimizer"])

