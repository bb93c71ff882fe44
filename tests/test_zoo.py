"""Strategy zoo I: fixed schedules, sdn, kd-anneal, byot, distill all_later. Every objective is checked against
a hand computation in numpy (float64) on a 3-exit toy, never against the code under test."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.backbones.contract import MultiExitNet
from bench.errors import ConfigError
from bench.registry import METHODS, load_all
from methods.distill import DistillParams, distill_loss
from methods.kd_anneal import KDAnnealParams, kd_anneal_loss
from methods.sdn import default_c

load_all()


class Toy(MultiExitNet):
    """3 exits of linear stages (no BatchNorm, no dropout: deterministic in train mode); exit k's embedding is
    its stage output, 5, 4 and 6 wide."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.num_exits = 3
        widths = [3, 5, 4, 6]
        self.stages = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.heads = nn.ModuleList(nn.Linear(w, 4) for w in widths[1:])
        self.double()

    def stage(self, k, state):
        return torch.tanh(self.stages[k](state)) + 0.3

    def head(self, k, state):
        return self.heads[k](state)


class ToyWithEmbeddings(Toy):
    def head_embedded(self, k, state):
        return self.heads[k](state), state


X = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 3, 1, 0])


def strategy(name, model, values=None, lr=0.1, total_steps=1, steps_per_epoch=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return METHODS.build(name, values or {}, model=model, optimizer=opt, total_steps=total_steps,
                         steps_per_epoch=steps_per_epoch)


# numpy reference ------------------------------------------------------------------------------------------
def np_logits(model):
    with torch.no_grad():
        return [z.numpy().astype(np.float64) for z in model(X)]


def softmax(z, T=1.0):
    e = np.exp(z / T - (z / T).max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ce(z):
    y = Y.numpy()
    return float(np.mean(-np.log(softmax(z)[np.arange(len(y)), y])))


def soft_ce(teacher_z, student_z, T):  # -mean_i sum_j p_teacher log p_student
    return float(np.mean(-(softmax(teacher_z, T) * np.log(softmax(student_z, T))).sum(1)))


def kl(teacher_z, student_z, T):  # KL(p_teacher || p_student), summed over classes, mean over samples
    p, q = softmax(teacher_z, T), softmax(student_z, T)
    return float(np.mean((p * (np.log(p) - np.log(q))).sum(1)))


# fixed schedules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, values, weights", [
    ("uniform", {}, [1, 1, 1]),
    ("uniform", {"exit_weights": "uniform"}, [1, 1, 1]),
    ("linear", {}, [1 / 6, 2 / 6, 3 / 6]),
    ("uniform", {"exit_weights": "linear"}, [1 / 6, 2 / 6, 3 / 6]),
    ("last", {}, [0, 0, 1]),
    ("uniform", {"exit_weights": [0.2, 0, 2.5]}, [0.2, 0, 2.5]),
])
def test_fixed_schedules(name, values, weights):
    model = Toy()
    z = np_logits(model)
    out = strategy(name, model, values).step(X, Y, 0)
    assert out.loss == pytest.approx(sum(w * ce(zk) for w, zk in zip(weights, z)), abs=1e-6)


def test_last_leaves_earlier_heads_untouched_by_weight_decay():
    model = Toy()
    before = [p.clone() for p in model.heads[0].parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    METHODS.build("last", {}, model=model, optimizer=opt, total_steps=1).step(X, Y, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.heads[0].parameters()))
    assert not torch.equal(model.heads[2].weight, Toy().heads[2].weight)


@pytest.mark.parametrize("values, message", [
    ({"exit_weights": "quadratic"}, "unknown schedule 'quadratic'"),
    ({"exit_weights": [1, -1, 1]}, "numbers >= 0"),
    ({"exit_weights": [0, 0, 0]}, "not all 0"),
])
def test_bad_schedules_name_the_field(values, message):
    with pytest.raises(ConfigError, match="method.exit_weights") as err:
        METHODS.params("uniform", values, where="method")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wrong_number_of_weights():
    with pytest.raises(ConfigError, match=r"method.exit_weights: 3 exits need 3 weights, got 2"):
        strategy("uniform", Toy(), {"exit_weights": [1, 1]})


# sdn ------------------------------------------------------------------------------------------------------
def test_sdn_default_c():
    assert default_c(6) == [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]
    assert default_c(3) == pytest.approx([0.15, 0.525, 0.9])
    assert default_c(1) == [0.15]


def test_sdn_tau_first_middle_last_epoch():
    # 5 epochs of 10 steps, 2 internal exits: C = [0.15, 0.9]; tau = min(C, 0.01 + e * C / 5), e = 1..5
    s = strategy("sdn", Toy(), total_steps=50, steps_per_epoch=10)
    assert s.taus(0) == pytest.approx([0.01 + 0.15 / 5, 0.01 + 0.9 / 5])  # e = 1: 0.04, 0.19
    assert s.taus(2) == pytest.approx([0.10, 0.55])  # e = 3: 0.01 + 3 * C / 5
    assert s.taus(4) == pytest.approx([0.15, 0.9])  # e = 5: 0.01 + C > C, capped at C
    given = strategy("sdn", Toy(), {"c": [0.5, 0.05]}, total_steps=50, steps_per_epoch=10)
    assert given.taus(3) == pytest.approx([0.01 + 4 * 0.5 / 5, 0.05])


def test_sdn_objective():
    model = Toy()
    z = np_logits(model)
    s = strategy("sdn", model, total_steps=40, steps_per_epoch=10)
    out = s.step(X, Y, 25)  # epoch 3 of 4 (e = 3): tau = [0.01 + 3 * 0.15 / 4, min(0.9, 0.01 + 3 * 0.9 / 4)]
    taus = [0.01 + 0.75 * 0.15, 0.01 + 0.75 * 0.9]
    assert out.loss == pytest.approx(taus[0] * ce(z[0]) + taus[1] * ce(z[1]) + ce(z[2]), abs=1e-6)


def test_sdn_c_of_the_wrong_length():
    with pytest.raises(ConfigError, match=r"method.c: 2 internal exits need 2 values, got 3"):
        strategy("sdn", Toy(), {"c": [0.1, 0.2, 0.3]})


# kd-anneal ------------------------------------------------------------------------------------------------
def test_kd_anneal_objective_at_a_temperature():
    model = Toy()
    z = np_logits(model)
    logits = [torch.tensor(v, requires_grad=True) for v in z]
    losses = torch.stack([torch.nn.functional.cross_entropy(t, Y, reduction="none") for t in logits], 1)
    p, T = KDAnnealParams(c=0.3, global_scale=1.5), 2.7
    objective, maxprob = kd_anneal_loss(logits, losses, p, T)
    hand = 1.5 * ((1 - 0.3) * sum(ce(v) for v in z) + 0.3 * T * T * sum(soft_ce(z[2], v, T) for v in z[:2]))
    assert float(objective.detach()) == pytest.approx(hand, abs=1e-6)
    assert float(maxprob) == pytest.approx(float(softmax(z[2], T).max(1).mean()), abs=1e-12)
    objective.backward()
    assert logits[2].grad is not None  # through its own CE; the teacher side is detached


def test_kd_anneal_step_objective():
    model = Toy()
    z = np_logits(model)
    out = strategy("kd-anneal", model).step(X, Y, 0)  # T = 1 at the first step
    hand = 0.5 * sum(ce(v) for v in z) + 0.5 * sum(soft_ce(z[2], v, 1.0) for v in z[:2])
    assert out.loss == pytest.approx(hand, abs=1e-6) and out.extras["temperature"] == 1.0


def test_kd_anneal_temperature_schedule():
    model = Toy()
    with torch.no_grad():  # a confident teacher: mean max-probability 0.9+ at T = 1
        model.heads[2].weight.mul_(40)
    z = np_logits(model)
    # lr = 0 keeps the logits fixed, so T grows by 1.05 per step exactly while maxprob(z_K / T) > 0.5
    s = strategy("kd-anneal", model, lr=0.0)
    raised = next(n for n in range(1000) if softmax(z[2], 1.05 ** n).max(1).mean() <= 0.5)
    assert 3 <= raised <= 60
    for i in range(raised + 5):
        s.step(X, Y, i)
        assert s.temperature == pytest.approx(1.05 ** min(i + 1, raised), rel=1e-12)
    assert s.state_dict()["temperature"] == pytest.approx(1.05 ** raised)
    fresh = strategy("kd-anneal", Toy())
    fresh.load_state_dict(s.state_dict())
    assert fresh.temperature == s.temperature


# byot -----------------------------------------------------------------------------------------------------
def test_byot_objective_with_hints():
    model = ToyWithEmbeddings()
    s = strategy("byot", model, {"temperature": 2.0, "alpha": 0.3, "beta": 0.01})
    s._build_projections([5, 4, 6])
    with torch.no_grad():
        for proj in s.projections:
            proj.weight.copy_(torch.linspace(-1, 1, proj.weight.numel(), dtype=torch.float64).view_as(proj.weight))
        logits, embeds = model(X, embeddings=True)
    z = [v.numpy() for v in logits]
    f = [v.numpy() for v in embeds]
    P = [proj.weight.detach().numpy() for proj in s.projections]
    hint = 0.0
    for k in range(2):
        g = f[k] @ P[k].T
        mask = (g > 0) | (f[2] > 0)
        hint += float((((g - f[2]) ** 2) * mask).sum())
    T = 2.0
    hand = 0.7 * sum(ce(v) for v in z) + 0.3 * T * T * sum(soft_ce(z[2], v, T) for v in z[:2]) + 0.01 * hint
    out = s.step(X, Y, 0)
    assert out.loss == pytest.approx(hand, abs=1e-6)
    assert all(p.grad is not None for p in s.projections.parameters())


def test_byot_without_hint_and_identity_projection():
    model = Toy()
    z = np_logits(model)
    out = strategy("byot", model, {"beta": 0}).step(X, Y, 0)
    T = 3.0
    assert out.loss == pytest.approx(0.9 * sum(ce(v) for v in z) + 0.1 * T * T * sum(
        soft_ce(z[2], v, T) for v in z[:2]), abs=1e-6)
    s = strategy("byot", ToyWithEmbeddings())
    s._build_projections([6, 4, 6])
    assert isinstance(s.projections[0], nn.Identity) and isinstance(s.projections[1], nn.Linear)


def test_byot_projections_survive_a_checkpoint():
    model = ToyWithEmbeddings()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    s = METHODS.build("byot", {}, model=model, optimizer=opt, total_steps=2)
    s.step(X, Y, 0)
    s.step(X, Y, 1)
    other = strategy("byot", ToyWithEmbeddings())
    other.load_state_dict(s.state_dict())
    for a, b in zip(s.projections.parameters(), other.projections.parameters()):
        assert torch.equal(a, b)
    momentum = other.projection_optimizer.state_dict()["state"]
    assert momentum.keys() == s.projection_optimizer.state_dict()["state"].keys() and momentum
    assert other.projection_optimizer.param_groups[0]["momentum"] == 0.9


def test_byot_hint_on_a_backbone_without_embeddings():
    with pytest.raises(ConfigError, match=r"method.beta: .*does not expose.*set method.beta=0"):
        strategy("byot", Toy())


# distill all_later ----------------------------------------------------------------------------------------
def test_distill_all_later_objective():
    model = Toy()
    z = np_logits(model)
    logits = [torch.tensor(v) for v in z]
    losses = torch.stack([torch.nn.functional.cross_entropy(t, Y, reduction="none") for t in logits], 1)
    T, g = 2.0, 0.4
    objective = distill_loss(logits, losses, DistillParams(temperature=T, gamma=g, teacher="all_later"))
    hand = ce(z[2]) + (1 - g) * ce(z[0]) + g * T * T * (kl(z[1], z[0], T) + kl(z[2], z[0], T)) \
        + (1 - g) * ce(z[1]) + g * T * T * kl(z[2], z[1], T)
    assert float(objective) == pytest.approx(hand, abs=1e-6)


# the contract's embeddings --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, values, size", [
    ("tiny", {"head_hidden": 7}, 8), ("msdnet-cifar-budget", {}, 32), ("ranet-cifar", {}, 32),
    ("sdn", {"arch": "cifar_resnet20", "cuts": ["layer1", "layer2"]}, 32),
])
def test_every_backbone_family_gives_embeddings_in_the_same_pass(name, values, size):
    from bench.registry import BACKBONES

    model = BACKBONES.build(name, values, num_classes=10, in_channels=3, image_size=size).eval()
    assert model.has_embeddings
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        plain = model(x)
        logits, embeds = model(x, embeddings=True)
    assert len(embeds) == model.num_exits and all(e.dim() == 2 and e.shape[0] == 2 for e in embeds)
    for k in range(model.num_exits):
        torch.testing.assert_close(logits[k], plain[k], rtol=0, atol=0)
        # the embedding is exactly what the head's final linear layer reads
        linear = [m for m in model.head_module(k).modules() if isinstance(m, nn.Linear)][-1]
        torch.testing.assert_close(linear(embeds[k]), logits[k], rtol=0, atol=1e-6)
    assert math.isfinite(float(sum(e.sum() for e in embeds)))
