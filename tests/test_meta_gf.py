"""`meta-gf`: the copies' update, the fusion of fixed copies with fixed weights, one meta step, the end of an
epoch (trailing Adam step, EMA, model replaced), each against a computation written here; and resume."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_surgery import resume_equals_uninterrupted
from toys import ChainNet

from bench.errors import ConfigError
from bench.registry import METHODS, load_all

load_all()


def build(model, lr=0.5, epochs=4, steps_per_epoch=2, **params):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return METHODS.build("meta-gf", params, model=model, optimizer=opt, total_steps=epochs * steps_per_epoch,
                         steps_per_epoch=steps_per_epoch)


def batch(n=6, d=3, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def chain_forward(params, x, K):
    """ChainNet by hand: h_k = tanh(W_k h_{k-1} + b_k), z_k = H_k h_k + c_k."""
    h, out = x, []
    for k in range(K):
        h = torch.tanh(h @ params[f"stages.{k}.weight"].T + params[f"stages.{k}.bias"])
        out.append(h @ params[f"heads.{k}.weight"].T + params[f"heads.{k}.bias"])
    return out


def reaching(name, K):
    """Exits (0-based) whose loss reaches a ChainNet tensor: stage s -> s..K-1, head k -> k."""
    kind, k = name.split(".")[:2]
    return list(range(int(k), K)) if kind == "stages" else [int(k)]


def randomise(strategy, seed=2):
    """Distinct random weights in every copy and random fusion weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in strategy.copies:
            for p in c.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        strategy.alpha.copy_(torch.randn(strategy.alpha.shape, generator=g))


def fused_by_hand(strategy, alpha, K):
    names = [n for n, _ in strategy.model.named_parameters()]
    copies = [dict(c.named_parameters()) for c in strategy.copies]
    out = {}
    for i, n in enumerate(names):
        ks = reaching(n, K)
        s = {k: torch.sigmoid(alpha[k, i]) for k in ks}
        out[n] = sum(s[k] * copies[k][n].detach() for k in ks) / sum(s.values())
    return out


def test_copy_k_trains_on_its_exit_plus_weighted_others():
    """K = 3, c = [1, 1, 0.6], aux 0.1: copy k steps on CE_k + 0.1 sum_{j != k} c_j CE_j; the model is untouched."""
    torch.manual_seed(0)
    model = ChainNet(d=3, K=3)
    strategy = build(model, lr=0.5)
    x, y = batch()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = strategy.step(x, y, 0)
    c = [1.0, 1.0, 0.6]
    for k in range(3):
        theta = {n: v.clone().requires_grad_() for n, v in start.items()}
        ce = [F.cross_entropy(z, y) for z in chain_forward(theta, x, 3)]
        loss = ce[k] + 0.1 * sum(c[j] * ce[j] for j in range(3) if j != k)
        grads = torch.autograd.grad(loss, list(theta.values()))
        for (n, v), g in zip(start.items(), grads):
            torch.testing.assert_close(dict(strategy.copies[k].named_parameters())[n].detach(), v - 0.5 * g,
                                       rtol=1e-12, atol=1e-12)
        assert math.isclose(float(out.exit_losses[k]), float(ce[k].detach()), rel_tol=1e-6)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), start[n])


def test_fusion_of_fixed_copies_with_fixed_weights():
    torch.manual_seed(0)
    K = 3
    strategy = build(ChainNet(d=3, K=K))
    x, _ = batch()
    strategy.reach = strategy.reach_mask(x)
    names = [n for n, _ in strategy.model.named_parameters()]
    assert strategy.reach.tolist() == [[k in reaching(n, K) for n in names] for k in range(K)]
    randomise(strategy)
    fused = strategy.fused(strategy.stacked())
    want = fused_by_hand(strategy, strategy.alpha.detach(), K)
    for n in names:
        torch.testing.assert_close(fused[n], want[n], rtol=1e-12, atol=1e-12)
    # a head is its own copy's head, whatever the weights (s * theta / s: equal up to rounding)
    torch.testing.assert_close(fused["heads.1.weight"], dict(strategy.copies[1].named_parameters())["heads.1.weight"],
                               rtol=1e-15, atol=1e-15)


def meta_grad_by_hand(strategy, alpha0, x, y, epoch, epochs, K):
    """d/d alpha of sum_{k<K} min(C_k, 0.01 + epoch C_k / epochs) CE_k + CE_K at the fused weights."""
    a = alpha0.clone().requires_grad_()
    logits = chain_forward(fused_by_hand(strategy, a, K), x, K)
    C = [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]
    loss = sum(min(C[k], 0.01 + epoch * C[k] / epochs) * F.cross_entropy(logits[k], y) for k in range(K - 1))
    loss = loss + F.cross_entropy(logits[-1], y)
    return torch.autograd.grad(loss, a)[0], float(loss.detach())


def test_one_meta_step_is_adam_on_the_fusion_loss():
    """Adam's first step: alpha - lr * g / (|g| + eps) elementwise (both moments bias-corrected)."""
    torch.manual_seed(0)
    K = 2
    strategy = build(ChainNet(d=3, K=K), epochs=4)
    x, y = batch()
    strategy.reach = strategy.reach_mask(x)
    randomise(strategy)
    alpha0 = strategy.alpha.detach().clone()
    g, loss = meta_grad_by_hand(strategy, alpha0, x, y, epoch=1, epochs=4, K=K)
    assert g[:, 0].abs().min() > 1e-6  # the shared stage's weights really get a meta gradient
    fused, got_loss = strategy.meta_step(strategy.stacked(), x, y, epoch=1)
    assert math.isclose(got_loss, loss, rel_tol=1e-6)
    torch.testing.assert_close(strategy.alpha.detach(), alpha0 - 0.1 * g / (g.abs() + 1e-8), rtol=0, atol=1e-6)
    want = fused_by_hand(strategy, alpha0, K)
    for n in want:
        torch.testing.assert_close(fused[n], want[n], rtol=1e-12, atol=1e-12)


def test_end_epoch_adam_trailing_step_ema_and_new_model():
    """One batch in the pass: Adam step on g, a trailing step on zero gradients, then
    alpha = 0.1 * alpha_after + 0.9 * alpha_before; the model holds the batch's fused weights (alpha before)."""
    torch.manual_seed(0)
    K = 2
    strategy = build(ChainNet(d=3, K=K), epochs=4)
    x, y = batch()
    strategy.reach = strategy.reach_mask(x)
    randomise(strategy)
    alpha0 = strategy.alpha.detach().clone()
    g, _ = meta_grad_by_hand(strategy, alpha0, x, y, epoch=0, epochs=4, K=K)
    want_model = fused_by_hand(strategy, alpha0, K)
    strategy.end_epoch(0, [(x, y)])
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    a1 = alpha0 - lr * g / (g.abs() + eps)
    m2, v2 = b1 * (1 - b1) * g, b2 * (1 - b2) * g * g  # second step: zero gradient, moments decay
    a2 = a1 - lr / (1 - b1**2) * m2 / ((v2 / (1 - b2**2)).sqrt() + eps)
    torch.testing.assert_close(strategy.alpha.detach(), 0.1 * a2 + 0.9 * alpha0, rtol=0, atol=1e-6)
    for n, p in strategy.model.named_parameters():
        torch.testing.assert_close(p.detach(), want_model[n], rtol=1e-12, atol=1e-12)
    assert strategy.meta_lr(1) == 0.1 and strategy.meta_lr(2) == pytest.approx(0.01)  # x0.1 from half of 4 epochs
    assert build(ChainNet(d=3, K=K), epochs=4, meta_lr_drop=None).meta_lr(3) == 0.1


def test_defaults_cover_seven_exits_and_say_what_to_give_beyond():
    with pytest.raises(ConfigError, match=r"method.aux_weights: .* needs 8; give method.aux_weights as a list of 8"):
        build(ChainNet(d=3, K=8))
    build(ChainNet(d=3, K=8), aux_weights=[1.0] * 8, meta_coeffs=[0.1] * 7)
    with pytest.raises(ConfigError, match="method.meta_coeffs: this backbone needs 2 values, got 1"):
        build(ChainNet(d=3, K=3), meta_coeffs=[0.1])


@pytest.mark.slow
def test_meta_gf_resume_equals_uninterrupted(tmp_path):
    """Checkpoint after epoch 1 (fusion weights, Adam, the copies' momentum) + resume = the uninterrupted run."""
    full = resume_equals_uninterrupted(tmp_path, {"name": "meta-gf"})
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["strategy"]
    # alpha: one row per exit, one column per parameter tensor (8 per tiny exit: 2 convs, 2 BNs x2, a linear x2)
    assert state["alpha"].shape == (3, 3 * 8) and not torch.equal(state["alpha"], torch.ones(3, 24))
    assert len(state["copy_optimizers"]) == 3 and full.epochs[-1]["val_acc_last"] > 0


def test_frozen_parameters_stay_as_they_are():
    """A parameter with requires_grad off (a regime's frozen backbone) is trained by no copy and fused from none."""
    torch.manual_seed(0)
    model = ChainNet(d=3, K=2)
    model.stages[0].weight.requires_grad_(False)
    frozen, bias = model.stages[0].weight.detach().clone(), model.stages[0].bias.detach().clone()
    strategy = build(model, epochs=2, steps_per_epoch=1)
    x, y = batch()
    strategy.step(x, y, 0)
    assert not strategy.reach[:, 0].any() and strategy.reach[:, 1].all()  # stages.0.weight frozen, its bias not
    strategy.end_epoch(0, [(x, y)])
    assert torch.equal(model.stages[0].weight, frozen)
    assert not torch.equal(model.stages[0].bias, bias)  # its trainable neighbour was trained and fused


@pytest.mark.slow
def test_meta_gf_under_the_disjoint_regime_fuses_only_the_heads(tmp_path):
    """Phase 2 of `disjoint` freezes the backbone and the last head: Meta-GF's copies train and fuse only the
    earlier heads, so everything else leaves phase 2 exactly as phase 1 left it."""
    from test_surgery import DIGITS

    from bench.config import validate_trial
    from bench.trial import train

    cfg = validate_trial({**DIGITS, "method": {"name": "meta-gf"}, "regime": {"name": "disjoint"},
                          "out_dir": str(tmp_path / "run")})
    after_phase1 = {}

    def keep(row, run_dir):
        if row["epoch"] == 1:
            after_phase1.update(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])

    train.run(cfg, on_epoch=keep)
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    changed = {n for n, v in final["model"].items() if not torch.equal(v, after_phase1[n])}
    assert changed and all(n.startswith(("heads.0.", "heads.1.")) for n in changed), changed
    assert not torch.equal(final["strategy"]["phase2"]["alpha"], torch.ones(3, 24))
