"""Strategies `boosted` and `ztw`: objectives, readouts and updates against computations written here."""

import pytest
import torch
import torch.nn.functional as F
from toys import ChainNet

from bench.errors import ConfigError
from bench.readout import build_readout, readout_outputs
from bench.registry import METHODS, load_all

load_all()




def data(n=8, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def hand_exits(net, x, ge):
    """The raw exits, with gradient equilibrium written out as gradient hooks when `ge`."""
    K, state, outs = net.num_exits, x, []
    for k in range(K):
        state = net.stage(k, state)
        head_in, next_in = state.clone(), state.clone()
        if ge:
            head_in.register_hook(lambda g, r=K - k: g / r)
            next_in.register_hook(lambda g, r=K - k: g * (r - 1) / r)
        outs.append(net.head(k, head_in))
        state = next_in
    return outs


def grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def strategy_for(name, net, params=None, total_steps=1, steps_per_epoch=None, lr=0.0, classes=3):
    readout = build_readout({"name": name, **(params or {})}, net.num_exits, classes).double()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    return METHODS.build(name, params or {}, model=net, optimizer=opt, total_steps=total_steps,
                         steps_per_epoch=steps_per_epoch, readout=readout)


# ------------------------------------------------------------------------------------------- boosted


@pytest.mark.parametrize("ge", [True, False])
def test_boosted_objective_and_gradient_by_hand(ge):
    torch.manual_seed(0)
    net, (x, y) = ChainNet(), data()
    ref = ChainNet()
    ref.load_state_dict(net.state_dict())
    strategy = strategy_for("boosted", net, {"ge": ge})
    out = strategy.step(x, y, 0)
    # L = sum_k CE(f_k + 0.5 * sg(F_{k-1})), F_k = f_k + 0.5 F_{k-1}, F_0 = 0
    f = hand_exits(ref, x, ge)
    F1 = f[0]
    F2 = f[1] + 0.5 * F1
    loss = (F.cross_entropy(f[0], y) + F.cross_entropy(f[1] + 0.5 * F1.detach(), y)
            + F.cross_entropy(f[2] + 0.5 * F2.detach(), y))
    loss.backward()
    assert out.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(net)[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_boosted_readout_by_hand_and_detached():
    f = [torch.randn(5, 4, requires_grad=True) for _ in range(3)]
    readout = build_readout({"name": "boosted", "gamma": 0.3}, 3, 4)
    out = readout_outputs(readout, f)
    torch.testing.assert_close(out[0], f[0])
    torch.testing.assert_close(out[1], f[1] + 0.3 * f[0])
    torch.testing.assert_close(out[2], f[2] + 0.3 * f[1] + 0.09 * f[0])
    out[2].sum().backward()  # training sees sg(F_{k-1}): exit 3's output sends no gradient to exits 1, 2
    assert f[0].grad is None and f[1].grad is None and f[2].grad is not None
    assert readout.exit_macs() == [0, 4, 4]


def test_boosted_loss_equal_by_hand():
    torch.manual_seed(1)
    net = ChainNet()
    ref = ChainNet()
    ref.load_state_dict(net.state_dict())
    strategy = strategy_for("boosted", net, {"ge": False, "loss_equal": True}, total_steps=2)
    batches = [data(seed=1), data(seed=2)]
    outs = [strategy.step(x, y, i) for i, (x, y) in enumerate(batches)]
    ema = None
    for (x, y), out in zip(batches, outs):
        f = hand_exits(ref, x, ge=False)
        F_prev, losses = None, []
        for z in f:
            target = z if F_prev is None else z + 0.5 * F_prev.detach()
            losses.append(F.cross_entropy(target, y))
            F_prev = target
        values = [float(v.detach()) for v in losses]
        ema = values if ema is None else [0.9 * e + 0.1 * v for e, v in zip(ema, values)]
        mean = sum(ema) / 3
        expected = sum(v / e * mean for v, e in zip(values, ema))
        assert out.loss == pytest.approx(expected, rel=1e-10)
    assert strategy.state_dict()["loss_ema"] == pytest.approx(ema, rel=1e-10)


# ----------------------------------------------------------------------------------------------- ZTW


def layer_norm(v, weight, bias, eps=1e-5):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps) * weight + bias


def test_ztw_readout_for_fixed_weights_by_hand():
    torch.manual_seed(0)
    K, C = 3, 5
    readout = build_readout({"name": "ztw"}, K, C)
    with torch.no_grad():
        for p in readout.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    f = [torch.randn(6, C) for _ in range(K)]
    W = [lin.weight for lin in readout.cascade]
    g = [(n.weight, n.bias) for n in readout.norms]
    o1 = f[0]
    o2 = f[1] + layer_norm(o1, *g[0]) @ W[0].T
    o3 = f[2] + layer_norm(o2, *g[1]) @ W[1].T
    logp = [torch.log_softmax(o, -1) for o in (o1, o2, o3)]
    w, b = readout.ensemble_weights, readout.ensemble_bias
    expected = [sum(torch.exp(w[k][j]) * logp[j] for j in range(k + 1)) / (k + 1) + b[k] for k in range(K)]
    with torch.no_grad():
        got = readout_outputs(readout, f)
        cascaded = readout.cascaded(f)
    for k in range(K):
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cascaded[2], o3, rtol=1e-5, atol=1e-6)
    assert readout.exit_macs() == [C, C * C + 5 * C + 2 * C, C * C + 5 * C + 3 * C]


def test_ztw_cascade_takes_the_previous_output_detached():
    readout = build_readout({"name": "ztw"}, 3, 4)
    f = [torch.randn(2, 4, requires_grad=True) for _ in range(3)]
    o = readout.cascaded(f)
    o[1].sum().backward()
    assert f[0].grad is None and f[1].grad is not None
    assert readout.cascade[0].weight.grad is not None and readout.cascade[0].weight.grad.abs().sum() > 0


def test_ztw_stage1_objective_then_stage2_adam_step_on_a_frozen_network():
    torch.manual_seed(0)
    net, (x, y) = ChainNet(), data()
    # 4 iterations, 1 per epoch; ensemble_fraction 0.5: iterations 0-1 stage 1, 2-3 stage 2
    strategy = strategy_for("ztw", net, {"ensemble_fraction": 0.5}, total_steps=4, steps_per_epoch=1, lr=0.1)
    readout = strategy.readout
    assert len(strategy.optimizer.param_groups) == 2  # the cascade weights train with the trial's optimiser
    with torch.no_grad():
        cascaded = readout.cascaded(net(x))
    expected = sum(F.cross_entropy(o, y) for o in cascaded) / 3
    cascade_before = [p.clone() for p in readout.cascade_parameters()]
    out = strategy.step(x, y, 0)
    assert out.loss == pytest.approx(float(expected), rel=1e-10)
    assert any(not torch.equal(a, b) for a, b in zip(cascade_before, readout.cascade_parameters()))
    strategy.step(x, y, 1)

    # stage 2: an independent Adam first step on the ensembles, nothing else moves
    net_before = {k: v.clone() for k, v in net.state_dict().items()}
    cascade_before = [p.clone() for p in readout.cascade_parameters()]
    ens = [p.detach().clone().requires_grad_(True) for p in readout.ensemble_parameters()]
    with torch.no_grad():
        log_probs = [torch.log_softmax(o, -1) for o in readout.cascaded(net.eval()(x))]
    net.train()
    weights, bias = ens[:3], ens[3]
    outputs = [sum(torch.exp(weights[k][j]) * log_probs[j] for j in range(k + 1)) / (k + 1) + bias[k]
               for k in range(3)]
    loss = sum(F.cross_entropy(o, y) for o in outputs) / 3
    loss.backward()
    out = strategy.step(x, y, 2)
    assert out.loss == pytest.approx(float(loss.detach()), rel=1e-10)
    lr = 1e-3  # cosine at the stage's first iteration: the full lr
    for p, start in zip(readout.ensemble_parameters(), ens):
        step = lr * start.grad / (start.grad.abs() + 1e-8)  # Adam's first step (bias-corrected)
        torch.testing.assert_close(p.detach(), start.detach() - step, rtol=1e-6, atol=1e-9)
    for k, v in net.state_dict().items():
        assert torch.equal(v, net_before[k]), k
    assert all(torch.equal(a, b) for a, b in zip(cascade_before, readout.cascade_parameters()))
    assert not net.training  # frozen in eval mode (BatchNorm statistics stay)


def test_ztw_needs_an_epoch_per_stage():
    net = ChainNet()
    with pytest.raises(ConfigError, match="epochs >= 2"):
        strategy_for("ztw", net, total_steps=3, steps_per_epoch=3)
