"""`l2w`: the uniform limit, the meta gradient against finite differences and an independent reference
(deep copy + torch SGD step, as L2W-DEN does it), jvp = exact, the exit allocation, BN stats, checkpoints."""

import contextlib
import copy
import io
import math

import pytest
import torch

from bench.backbones.tiny import TinyNet, TinyParams
from bench.errors import ConfigError, UsageError
from bench.registry import METHODS, load_all
from methods.base import per_exit_ce
from methods.l2w import FastJvp, allocate_exits, running_stats_frozen, target_probs

load_all()


SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


def tiny(seed=0, classes=5, dtype=torch.float64):
    torch.manual_seed(seed)
    return TinyNet(TinyParams(widths=[4, 8]), classes, 3, 8).to(dtype)


def batch(n=8, classes=5, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def l2w(model, sgd=SGD, total_steps=10, steps_per_epoch=None, **params):
    opt = torch.optim.SGD(model.parameters(), **sgd)
    torch.manual_seed(123)  # the WPN's init
    return METHODS.build("l2w", params, model=model, optimizer=opt, total_steps=total_steps,
                         steps_per_epoch=steps_per_epoch), opt


def model_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("meta_grad", ["exact", "jvp", "finite_difference"])
def test_epsilon_zero_is_uniform_on_the_halves(meta_grad):
    """eps = 0: the same parameters and BN buffers as two uniform steps on the two halves, per iteration,
    although every iteration runs a meta step (the pseudo and meta forwards must leave no trace)."""
    model = tiny()
    reference = copy.deepcopy(model)
    strategy, _ = l2w(model, epsilon=0.0, meta_grad=meta_grad)
    uniform = METHODS.build("uniform", {}, model=reference, optimizer=torch.optim.SGD(reference.parameters(), **SGD),
                            total_steps=4)
    for it in range(2):
        x, y = batch(seed=it)
        out = strategy.step(x, y, it)
        a, b = uniform.step(x[:4], y[:4], 2 * it), uniform.step(x[4:], y[4:], 2 * it + 1)
        assert out.loss == pytest.approx((a.loss + b.loss) / 2, rel=1e-12) and out.extras["meta_loss"] > 0
        mine, theirs = model_state(model), model_state(reference)
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), key
    assert int(model.stages[0][0][1].num_batches_tracked) == 4  # one update per real forward, two per step


@pytest.mark.parametrize("meta_grad", ["exact", "jvp", "finite_difference"])
def test_bn_running_stats_move_once_per_real_forward(meta_grad):
    """eps = 0.8 with meta steps: the buffers are exactly those of one train-mode forward of half A at the
    starting parameters, then one of half B at the parameters after the first real update."""
    model = tiny()
    strategy, _ = l2w(model, meta_grad=meta_grad)
    start = copy.deepcopy(model)
    after_first = []
    real_step = strategy.optimizer_step

    def record(objective):
        real_step(objective)
        after_first.append({k: v.detach().clone() for k, v in model.named_parameters()})

    strategy.optimizer_step = record
    x, y = batch()
    strategy.step(x, y, 0)
    start(x[:4])
    with torch.no_grad():
        for k, v in start.named_parameters():
            v.copy_(after_first[0][k])
    start(x[4:])
    for (key, mine), theirs in zip(model.named_buffers(), start.buffers()):
        assert torch.equal(mine, theirs), key
    assert int(model.stages[1][0][1].num_batches_tracked) == 2


def reference_meta_loss(model, opt, wpn, eps, normalize, x_tr, y_tr, x_me, y_me, probs):
    """L_meta as L2W-DEN computes it: a copy of the network, torch SGD's own step (loaded with the real
    optimiser's state), the meta forward on the copy, the allocation written as the reference loops it."""
    net = copy.deepcopy(model)
    net.train()
    losses = per_exit_ce(net(x_tr), y_tr)
    t = wpn(losses.detach())
    t = t - {"row": t.mean(0, keepdim=True), "col": t.mean(1, keepdim=True), "mat": t.mean()}[normalize]
    w = 1 + eps * t
    grads = torch.autograd.grad((w * losses).mean(0).sum(), list(net.parameters()))
    step = torch.optim.SGD(net.parameters(), lr=1.0)
    step.load_state_dict(copy.deepcopy(opt.state_dict()))  # lr, momentum buffers, wd, dampening, nesterov
    for p, g in zip(net.parameters(), grads):
        p.grad = g
    step.step()
    logits = net(x_me)
    n, K = x_me.shape[0], len(logits)
    used, total = [], 0.0
    for k in range(K):
        conf = torch.softmax(logits[k].detach(), 1).amax(1)
        order = sorted(range(n), key=lambda i: -conf[i].item())  # python's sort is stable: ties by index
        free = [i for i in order if i not in used]
        chosen = free[: math.floor(n * float(probs[k]))] if k < K - 1 else free
        used += chosen
        if chosen:
            total = total + torch.nn.functional.cross_entropy(logits[k][chosen], y_me[chosen])
    return total


@pytest.mark.parametrize("sgd,warm,normalize", [
    (SGD, True, "col"),                                                          # momentum buffer present
    ({**SGD, "nesterov": True}, True, "row"),
    ({**SGD, "dampening": 0.3}, True, "mat"),
    (SGD, False, "col"),                                                         # first step: no buffer yet
])
def test_wpn_gradient_matches_finite_differences_and_reference(sgd, warm, normalize):
    model = tiny(seed=2)
    strategy, opt = l2w(model, sgd=sgd, normalize=normalize, wpn_hidden=16)
    x, y = batch(seed=3)
    if warm:  # create momentum buffers with one real step
        opt.zero_grad()
        per_exit_ce(model(x), y).mean(0).sum().backward()
        opt.step()
    x_tr, y_tr, x_me, y_me = x[:4], y[:4], x[4:], y[4:]
    logits = model(x_tr)
    losses = per_exit_ce(logits, y_tr)
    grads, meta = strategy.wpn_gradient(strategy.wpn_features(logits, losses), losses, x_tr, y_tr, x_me, y_me)

    def loss_at():
        return float(reference_meta_loss(model, opt, strategy.wpn, 0.8, normalize, x_tr, y_tr, x_me, y_me,
                                         strategy.probs).detach())

    assert meta == pytest.approx(loss_at(), rel=1e-12)
    g = torch.Generator().manual_seed(4)
    params = list(strategy.wpn.parameters())
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    h = 1e-5

    def shift(step):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(step * d)

    shift(h)
    plus = loss_at()
    shift(-2 * h)
    minus = loss_at()
    shift(h)
    fd = (plus - minus) / (2 * h)
    analytic = sum(float((gi * d).sum()) for gi, d in zip(grads, direction))
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_jvp_equals_exact_and_fd_is_close():
    """`jvp` as `step` runs it (conv primals recorded in the real forward and reused) and without the
    recording (every primal recomputed): both equal `exact`."""
    model = tiny(seed=5)
    x, y = batch(seed=6)
    sgd = {**SGD, "nesterov": True}
    warm = torch.optim.SGD(model.parameters(), **sgd)  # one real step: momentum buffers exist
    per_exit_ce(model(x), y).mean(0).sum().backward()
    warm.step()
    found = {}
    for mode, record in (("exact", False), ("jvp", True), ("jvp", False), ("finite_difference", False)):
        strategy, opt = l2w(model, sgd=sgd, meta_grad=mode, wpn_input="both")
        opt.load_state_dict(warm.state_dict())
        with strategy._fast_jvp.recording() if record else contextlib.nullcontext():
            logits = model(x[:4])
        losses = per_exit_ce(logits, y[:4])
        grads, _ = strategy.wpn_gradient(strategy.wpn_features(logits, losses), losses, x[:4], y[:4], x[4:], y[4:])
        assert not strategy._fast_jvp.outputs  # consumed by the jvp pass, never kept
        found[mode + ("-recorded" if record else "")] = torch.cat([g.flatten() for g in grads])
    assert found["exact"].norm() > 0
    torch.testing.assert_close(found["jvp-recorded"], found["exact"], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(found["jvp"], found["exact"], rtol=1e-10, atol=1e-13)
    rel = (found["finite_difference"] - found["exact"]).norm() / found["exact"].norm()
    assert rel < 0.1  # an approximation (ReLU kinks inside the +-r band), not a match


def test_target_probs_and_counts_match_reference_figures():
    probs = target_probs(5, 15)
    torch.testing.assert_close(probs, torch.tensor([0.328, 0.246, 0.184, 0.138, 0.104]), atol=6e-4, rtol=0)
    for n, expected in ((512, [167, 125, 94, 70, 56]), (256, [83, 62, 47, 35, 29])):
        exits = allocate_exits(torch.rand(n, 5), probs)
        assert torch.bincount(exits, minlength=5).tolist() == expected


def test_allocation_hand_cases():
    probs = torch.tensor([0.5, 0.3, 0.2])
    conf = torch.tensor([[0.9, 0.1, 0.0],
                         [0.9, 0.9, 0.0],
                         [0.5, 0.7, 0.0],
                         [0.9, 0.6, 0.0]])
    # exit 1 takes floor(4 * .5) = 2: a three-way tie at 0.9 goes to the earlier samples 0 and 1;
    # exit 2 takes floor(4 * .3) = 1 of the rest {2, 3}: sample 2 (0.7); the last exit takes sample 3.
    assert allocate_exits(conf, probs).tolist() == [0, 0, 1, 2]
    # n * q_k < 1: n = 3, q = (.43, .32, .24): exit 1 takes 1, exit 2 takes floor(0.97) = 0, the last the rest
    probs = target_probs(3, 15)
    conf = torch.tensor([[0.2, 0.9, 0.1], [0.8, 0.9, 0.1], [0.5, 0.9, 0.1]])
    assert allocate_exits(conf, probs).tolist() == [2, 0, 2]
    # q -> everything at the last exit
    assert allocate_exits(torch.rand(2, 4), target_probs(4, 15)).tolist() == [3, 3]


def test_empty_groups_add_nothing_and_uniform_objective():
    model = tiny(seed=7)
    strategy, _ = l2w(model)
    x, y = batch(n=3, seed=8)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        losses = per_exit_ce(model(x), y)  # 2 exits, n = 3: exit 1 takes floor(3 * 4/7) = 1, exit 2 the rest
        conf = torch.stack([torch.softmax(z, 1).amax(1) for z in model(x)], 1)
        first = int(conf[:, 0].argmax())
        rest = [i for i in range(3) if i != first]
        expected = losses[first, 0] + losses[rest, 1].mean()
        assert float(strategy.meta_loss(theta, x, y)) == pytest.approx(float(expected), rel=1e-12)
        strategy.params.meta_objective = "uniform"
        assert float(strategy.meta_loss(theta, x, y)) == pytest.approx(float(losses.mean(0).sum()), rel=1e-12)


@pytest.mark.parametrize("normalize,dim", [("row", 0), ("col", 1), ("mat", None)])
def test_weights_average_one(normalize, dim):
    strategy, _ = l2w(tiny(), normalize=normalize, epsilon=0.8)
    w = strategy.weights(torch.rand(6, 2, dtype=torch.float64) * 3)
    mean = w.mean() if dim is None else w.mean(dim)
    torch.testing.assert_close(mean, torch.ones_like(mean))
    assert w.std() > 0


def test_meta_interval_and_wpn_schedule():
    model = tiny()
    strategy, _ = l2w(model, meta_interval=2, total_steps=4)
    before = [p.detach().clone() for p in strategy.wpn.parameters()]
    x, y = batch()
    assert "meta_loss" in strategy.step(x, y, 0).extras
    after0 = [p.detach().clone() for p in strategy.wpn.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after0))
    assert "meta_loss" not in strategy.step(x, y, 1).extras  # 1 % 2 != 0: the WPN is not updated
    assert all(torch.equal(a, b) for a, b in zip(after0, strategy.wpn.parameters()))
    # cosine from 1e-4 over 4 steps: after 2 steps 0.5 * 1e-4 * (1 + cos(pi / 2))
    assert strategy.wpn_optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-4)


def test_meta_step_index_restarts_every_epoch():
    # The reference tests `i % meta_interval == 0` with i the batch index within the epoch: with 3 batches
    # per epoch and interval 2, meta steps at global steps 0, 2, 3, 5 (i = 0, 2 | 0, 2).
    strategy, _ = l2w(tiny(), meta_interval=2, total_steps=6, steps_per_epoch=3)
    x, y = batch()
    metas = [step for step in range(6) if "meta_loss" in strategy.step(x, y, step).extras]
    assert metas == [0, 2, 3, 5]


def test_state_dict_round_trip_continues_identically():
    model = tiny()
    strategy, opt = l2w(model)
    x, y = batch()
    strategy.step(x, y, 0)
    buf = io.BytesIO()
    torch.save({"strategy": strategy.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin = tiny(seed=9)
    twin.load_state_dict(saved["model"])
    twin_strategy, twin_opt = l2w(twin, total_steps=10)
    twin_opt.load_state_dict(saved["opt"])
    twin_strategy.load_state_dict(saved["strategy"])
    x2, y2 = batch(seed=10)
    a, b = strategy.step(x2, y2, 1), twin_strategy.step(x2, y2, 1)
    assert a.loss == b.loss and a.extras == b.extras
    for p, q in zip(strategy.wpn.parameters(), twin_strategy.wpn.parameters()):
        assert torch.equal(p, q)
    assert strategy.wpn_optimizer.param_groups[0]["lr"] == twin_strategy.wpn_optimizer.param_groups[0]["lr"]


def test_odd_batches_and_bad_settings():
    model = tiny(dtype=torch.float32)
    strategy, _ = l2w(model, meta_grad="jvp")
    x, y = batch(n=5, dtype=torch.float32)
    out = strategy.step(x, y, 0)  # split 3 + 2, as the reference's chunk(2)
    assert out.count == 5 and math.isfinite(out.loss)
    with pytest.raises(UsageError, match="batch_size >= 2"):
        strategy.step(x[:1], y[:1], 1)
    with pytest.raises(ConfigError, match="optim.name: sgd"):
        METHODS.build("l2w", {}, model=model, optimizer=torch.optim.Adam(model.parameters()), total_steps=1)
    with pytest.raises(ConfigError, match="method.normalize"):
        METHODS.params("l2w", {"normalize": "rows"}, where="method")
    imagenet = METHODS.params("l2w-imagenet")
    assert (imagenet.epsilon, imagenet.normalize, imagenet.meta_interval) == (0.3, "mat", 100)


def test_engine_resume_reproduces_uninterrupted_l2w_run(tmp_path):
    """The WPN, its Adam state and its schedule travel through the trial checkpoint."""
    pytest.importorskip("bench.evaluate")  # the engine's final evaluation (lands separately)
    from bench.config import validate_trial
    from bench.trial import train

    def cfg(where):
        return validate_trial({
            "data": {"name": "synthetic", "num_classes": 4, "image_size": 8, "train_size": 64, "test_size": 16,
                     "val_size": 0.25},
            "backbone": {"name": "tiny", "widths": [4, 8]},
            "method": {"name": "l2w", "wpn_hidden": 32, "meta_lr": 1e-2},
            "schedule": {"name": "cosine"}, "epochs": 2, "batch_size": 16, "progress": False,
            "deterministic": True, "out_dir": str(tmp_path / where)})

    full = train.run(cfg("a"))

    class Crash(Exception):
        pass

    def crash_after_first(row, run_dir):
        if row["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        train.run(cfg("b"), on_epoch=crash_after_first)
    resumed = train.run(cfg("b"))
    strip = ("time_s", "images_per_s")
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed.epochs] == \
           [{k: v for k, v in e.items() if k not in strip} for e in full.epochs]
    assert resumed.exits == full.exits


@pytest.mark.parametrize("meta_grad", ["exact", "jvp"])
def test_parameter_outside_the_loss_is_left_alone(meta_grad):
    """As torch SGD: a parameter the loss does not reach gets no gradient and no update; the WPN gradient
    is the same as without it."""
    x, y = batch(seed=11)
    found = []
    for extra in (False, True):
        model = tiny(seed=12)
        if extra:
            model.unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        strategy, _ = l2w(model, meta_grad=meta_grad)
        logits = model(x[:4])
        losses = per_exit_ce(logits, y[:4])
        grads, _ = strategy.wpn_gradient(strategy.wpn_features(logits, losses), losses, x[:4], y[:4], x[4:], y[4:])
        found.append(torch.cat([g.flatten() for g in grads]))
        strategy.step(x, y, 1)
        if extra:
            assert torch.equal(model.unused, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(found[0], found[1], rtol=1e-12, atol=1e-15)


def test_fast_jvp_conv_primals_reused_only_when_unchanged():
    """The jvp pass takes each conv's primal from the recorded real forward and computes only its tangent
    (bias included); a recorded output modified in place afterwards (conv -> ELU(inplace)) is recomputed.
    Either way the tangent equals plain forward-mode AD."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 5, 3, stride=2), torch.nn.ELU(inplace=True),
                              torch.nn.Flatten()).double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    theta = {k: v.detach() for k, v in net.named_parameters()}
    direction = {k: torch.randn_like(v) for k, v in theta.items()}
    expected = dual_output(net, theta, direction, x)
    fast = FastJvp(net)
    first, second = fast.convs
    with fast.recording():
        net(x)
    (out, version, _), = fast.outputs[first]
    assert out._version == version and fast.outputs[second][0][0]._version != fast.outputs[second][0][1]
    with fast.active():
        torch.testing.assert_close(dual_output(net, theta, direction, x), expected, rtol=1e-12, atol=1e-12)
    assert not fast.outputs

    # the recorded primal is what the pass uses: a wrong one (same version, same shape) changes the result
    with fast.recording():
        net(x)
    wrong = fast.outputs[first][0][0] * 2
    fast.outputs[first] = [(wrong, wrong._version, x.shape)]
    with fast.active():
        assert not torch.allclose(dual_output(net, theta, direction, x), expected)
    # ... and a recording of another batch size is not used
    with fast.recording():
        net(x[:2])
    with fast.active():
        torch.testing.assert_close(dual_output(net, theta, direction, x), expected, rtol=1e-12, atol=1e-12)


def dual_output(net, theta, direction, x):
    """Forward-mode tangent of net(x) along `direction`, BatchNorm on batch statistics (as the jvp pass)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    with torch.no_grad(), fwAD.dual_level(), running_stats_frozen(net):
        duals = {k: fwAD.make_dual(theta[k], direction[k]) for k in theta if k in direction}
        duals.update({k: v for k, v in theta.items() if k not in direction})
        return fwAD.unpack_dual(functional_call(net, duals, (x,))).tangent


@pytest.mark.parametrize("norm,shape", [(torch.nn.BatchNorm2d(4), (5, 4, 3, 3)), (torch.nn.BatchNorm1d(4), (6, 4)),
                                        (torch.nn.BatchNorm2d(4, affine=False), (5, 4, 3, 3)),
                                        (torch.nn.BatchNorm1d(4, track_running_stats=False), (6, 4, 2))])
@pytest.mark.parametrize("tangents", ["all", "input only", "weights only"])
def test_fast_jvp_batchnorm_tangent_equals_forward_ad(norm, shape, tangents):
    """The BatchNorm shortcut (native backward kernel for the input part) against torch's forward-mode rule,
    and torch's own rule kept where running statistics are in play (eval mode)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Identity(), norm).double()
    if norm.affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    x = torch.randn(shape, dtype=torch.float64)
    theta = {k: v.detach() for k, v in net.named_parameters()}
    direction = {k: torch.randn_like(v) for k, v in theta.items()} if tangents != "input only" else {}
    x_t = torch.randn_like(x) if tangents != "weights only" else None

    def run(fast):
        import torch.autograd.forward_ad as fwAD
        from torch.func import functional_call

        with torch.no_grad(), fwAD.dual_level(), running_stats_frozen(net), \
                fast.active() if fast else contextlib.nullcontext():
            params = {k: fwAD.make_dual(v, direction[k]) if k in direction else v for k, v in theta.items()}
            inp = x if x_t is None else fwAD.make_dual(x, x_t)
            out = functional_call(net, params, (inp,))
            primal, tangent = fwAD.unpack_dual(out)
            return primal, tangent

    if not direction and x_t is None:
        pytest.skip("a BatchNorm without affine parameters has no weight tangents")
    plain, fast = run(None), run(FastJvp(net))
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-12, atol=1e-12)
    if plain[1] is None:
        assert fast[1] is None
    else:
        torch.testing.assert_close(fast[1], plain[1], rtol=1e-10, atol=1e-12)
    net.eval()  # running statistics: the shortcut steps aside
    plain, fast = run(None), run(FastJvp(net))
    if plain[1] is not None:
        torch.testing.assert_close(fast[1], plain[1], rtol=1e-12, atol=1e-12)
