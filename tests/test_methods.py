"""Strategies `ge` and `distill` (and the shared base): rescaled gradients and the KD loss by hand."""

import math

import pytest
import torch
from torch import nn
from toys import ChainNet

from bench.backbones.contract import MultiExitNet
from bench.backbones.tiny import TinyNet, TinyParams
from bench.errors import ConfigError
from bench.registry import METHODS, load_all
from methods.base import StepOutput, combine, per_exit_ce
from methods.distill import DistillParams, distill_loss

load_all()




class TwoScaleNet(MultiExitNet):
    """Two stages whose state is a list [fine, coarse]; heads read the coarse tensor only (as MSDNet)."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.num_exits = 2
        self.fine, self.coarse = nn.Linear(d, d), nn.Linear(d, d)
        self.mix = nn.Linear(2 * d, d)
        self.heads = nn.ModuleList(nn.Linear(d, classes) for _ in range(2))
        self.double()

    def stage(self, k, state):
        if k == 0:
            return [torch.tanh(self.fine(state)), torch.tanh(self.coarse(state))]
        return [state[0], torch.tanh(self.mix(torch.cat(state, 1)))]

    def head(self, k, state):
        return self.heads[k](state[-1])


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def ge_grads(model, x, y, scope="all"):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the model as it is
    strategy = METHODS.build("ge", {"scope": scope}, model=model, optimizer=opt, total_steps=1)
    strategy.step(x, y, 0)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_ge_stage_gradient_is_mean_of_later_losses():
    """With GE, stage k (1-based) gets (1/(K-k+1)) * sum_{j>=k} dCE_j: the per-exit gradients G_j averaged."""
    torch.manual_seed(0)
    model, x, y = ChainNet(K=3), torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    per_loss = [grads_of(model, per_exit_ce(model(x), y).mean(0)[j]) for j in range(3)]
    ge = ge_grads(model, x, y)
    for k in range(3):
        for part in ("weight", "bias"):
            name = f"stages.{k}.{part}"
            expected = sum(per_loss[j][name] for j in range(k, 3)) / (3 - k)
            torch.testing.assert_close(ge[name], expected, rtol=1e-12, atol=1e-14)
            # heads are downstream of the rescaling: their own loss's gradient, unscaled
            torch.testing.assert_close(ge[f"heads.{k}.{part}"], per_loss[k][f"heads.{k}.{part}"])


def test_ge_two_stage_scales_and_coarsest_scope():
    """K = 2: head 1 and stage 2 each get 1/2 at the first boundary. `coarsest` leaves the fine tensor alone."""
    torch.manual_seed(1)
    model, x, y = TwoScaleNet(), torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    g0, g1 = (grads_of(model, per_exit_ce(model(x), y).mean(0)[j]) for j in range(2))
    both = ge_grads(model, x, y, "all")
    coarse = ge_grads(model, x, y, "coarsest")
    for part in ("weight", "bias"):
        # the fine tensor feeds only stage 2: scaled by 1/2 with scope all, untouched with coarsest
        torch.testing.assert_close(both[f"fine.{part}"], 0.5 * g1[f"fine.{part}"])
        torch.testing.assert_close(coarse[f"fine.{part}"], g1[f"fine.{part}"])
        for grads in (both, coarse):
            torch.testing.assert_close(grads[f"coarse.{part}"], 0.5 * (g0[f"coarse.{part}"] + g1[f"coarse.{part}"]))
            torch.testing.assert_close(grads[f"mix.{part}"], g1[f"mix.{part}"])
    assert not torch.allclose(both["fine.weight"], coarse["fine.weight"])


def test_ge_forward_unchanged_and_inplace_safe():
    torch.manual_seed(2)
    model = TinyNet(TinyParams(widths=[4, 8]), 3, 3, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = METHODS.build("ge", {}, model=model, optimizer=opt, total_steps=1)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    plain = model(x)
    rescaled = model(x, boundary=strategy.boundary)
    for a, b in zip(plain, rescaled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    out = strategy.step(x, torch.tensor([0, 1, 2, 0]), 0)
    assert math.isfinite(out.loss) and out.count == 4 and out.exit_losses.shape == (2,)


def kd_by_hand(logits, y, T, gamma, teacher, per_class_mean):
    """IMTA's loss_fn_kd written out with python floats."""
    K, N, C = len(logits), logits[0].shape[0], logits[0].shape[1]

    def softmax(row, t):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    def ce(z):
        return sum(-math.log(softmax(z[i], 1.0)[y[i]]) for i in range(N)) / N

    zs = [z.tolist() for z in logits]
    total = ce(zs[-1])
    for k in range(K - 1):
        kl = 0.0
        for i in range(N):
            later = [softmax(zs[j][i], T) for j in (range(k + 1, K) if teacher == "mean_later" else [K - 1])]
            p = [sum(col) / len(later) for col in zip(*later)]
            q = softmax(zs[k][i], T)
            kl += sum(p[c] * (math.log(p[c]) - math.log(q[c])) for c in range(C))
        kl /= N * C if per_class_mean else N
        total += (1 - gamma) * ce(zs[k]) + gamma * T * T * kl
    return total


@pytest.mark.parametrize("teacher", ["last", "mean_later"])
@pytest.mark.parametrize("reduction", ["batchmean", "imta_mean"])
def test_distill_loss_by_hand(teacher, reduction):
    torch.manual_seed(3)
    logits = [torch.randn(4, 5, dtype=torch.float64) * 2 for _ in range(3)]
    y = torch.tensor([0, 3, 1, 4])
    p = DistillParams(temperature=3.0, gamma=0.9, teacher=teacher, kl_reduction=reduction)
    got = distill_loss(logits, per_exit_ce(logits, y), p)
    expected = kd_by_hand(logits, y.tolist(), 3.0, 0.9, teacher, reduction == "imta_mean")
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_distill_teacher_is_detached_and_step_runs():
    torch.manual_seed(4)
    logits = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    y = torch.tensor([0, 1, 2])
    p = DistillParams(gamma=1.0)  # only KL on exit 1 and CE on exit 2
    distill_loss(logits, per_exit_ce(logits, y), p).backward()
    ce_only = torch.autograd.grad(per_exit_ce([logits[1]], y).mean(), logits[1])[0]
    torch.testing.assert_close(logits[1].grad, ce_only)  # the teacher gets no KD gradient

    model = TinyNet(TinyParams(widths=[4, 8]), 4, 3, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = METHODS.build("distill-soft", {}, model=model, optimizer=opt, total_steps=1)
    assert strategy.params.temperature == 3.0 and strategy.params.gamma == 0.9
    before = [q.detach().clone() for q in model.parameters()]
    out = strategy.step(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), 0)
    assert math.isfinite(out.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bad_params_are_config_errors():
    with pytest.raises(ConfigError, match="method.scope"):
        METHODS.params("ge", {"scope": "finest"}, where="method")
    with pytest.raises(ConfigError, match="method.temperature"):
        METHODS.params("distill", {"temperature": 0}, where="method")
    with pytest.raises(ConfigError, match="unknown field 'method.T'"):
        METHODS.params("distill", {"T": 3}, where="method")


def test_combine_weights_by_count():
    a = StepOutput(2.0, torch.tensor([1.0, 3.0]), torch.tensor([1, 2]), 2, {"meta_loss": 1.0})
    b = StepOutput(5.0, torch.tensor([4.0, 0.0]), torch.tensor([0, 1]), 1, {"meta_loss": 3.0})
    c = combine([a, b])
    assert c.loss == pytest.approx(3.0) and c.count == 3 and c.extras == {"meta_loss": 2.0}
    torch.testing.assert_close(c.exit_losses, torch.tensor([2.0, 2.0]))
    assert c.exit_correct.tolist() == [1, 3]
