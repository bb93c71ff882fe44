"""`block-dependent` (Han et al., TNNLS 2023): each exit's loss trains only its window of stages. The objective
and gradients against forwards written out here (each exit's chain rerun from a detached state, as the
reference's msdnet_overlap.py), bad parameters through the CLI, resume = uninterrupted, two gloo workers."""

import math

import pytest
import torch
import torch.nn.functional as F
from toys import ChainNet

from bench.registry import METHODS, load_all

load_all()

# (params, the first stage (0-based) each of 5 exits trains), written out for K = 5
WINDOWS = [
    ({"variant": "conventional"}, [0, 0, 0, 0, 0]),
    ({}, [0, 0, 0, 1, 2]),  # overlap 3
    ({"include_final": True}, [0, 0, 0, 1, 0]),
    ({"overlap": 2}, [0, 0, 1, 2, 3]),
    ({"variant": "no_overlap"}, [0, 0, 0, 3, 3]),  # the cut after stage 3
    ({"variant": "no_overlap", "cut": 2}, [0, 0, 2, 2, 2]),
    ({"variant": "local_error"}, [0, 1, 2, 3, 4]),
    ({"variant": "local_error", "include_final": True}, [0, 1, 2, 3, 0]),
]


def strategy_grads(model, x, y, params):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays as it was
    out = METHODS.build("block-dependent", params, model=model, optimizer=opt, total_steps=1).step(x, y, 0)
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def hand(model, x, y, starts, distill=None):
    """Exit k: stages 0..s_k-1 run without gradient, s_k..k with it, then head k; sum of CEs (+ distillation
    co * KL(sg p_K || p_k) at T, summed over classes, mean over samples)."""
    model.zero_grad()
    logits = []
    for k, s in enumerate(starts):
        h = x
        for j in range(k + 1):
            if j == s:
                h = h.detach()
            h = torch.tanh(h @ model.stages[j].weight.T + model.stages[j].bias)
        logits.append(h @ model.heads[k].weight.T + model.heads[k].bias)
    loss = sum(F.cross_entropy(z, y) for z in logits)
    if distill is not None:
        co, T = distill
        p = torch.softmax(logits[-1].detach() / T, 1)
        for z in logits:
            q = torch.softmax(z / T, 1)
            loss = loss + co * (p * (p.log() - q.log())).sum(1).mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("params, starts", WINDOWS, ids=[str(w[0]) for w in WINDOWS])
def test_each_exit_trains_its_window(params, starts):
    torch.manual_seed(0)
    model, x, y = ChainNet(K=5, d=3), torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    out, got = strategy_grads(model, x, y, params)
    loss, want = hand(model, x, y, starts)
    assert out.loss == pytest.approx(loss, rel=1e-12)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)
    if starts != [0] * 5:  # the windows matter: the plain sum's gradient differs
        _, plain = hand(model, x, y, [0] * 5)
        assert any(not torch.allclose(got[n], plain[n]) for n in plain)


def test_self_distillation_objective_and_gradients():
    torch.manual_seed(1)
    model, x, y = ChainNet(K=5, d=3), torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    out, got = strategy_grads(model, x, y, {"distill": True})  # 0.25, T = 1.5 by default
    loss, want = hand(model, x, y, [0, 0, 0, 1, 2], distill=(0.25, 1.5))
    assert out.loss == pytest.approx(loss, rel=1e-12)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, values", [("tiny", {"widths": [4, 6, 6, 8, 8]}), ("msdnet-cifar-budget", {}),
                                          ("ranet-cifar", {})])
def test_forward_values_unchanged_on_backbone_families(name, values):
    """Each head's input is a rerun of the same stages on the same values: the plain forward's logits."""
    from bench import backbones
    from methods.block_dependent import Windows

    torch.manual_seed(2)
    size = 8 if name == "tiny" else 32
    model = backbones.build({"name": name, **values}, 3, 3, size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = METHODS.build("block-dependent", {"overlap": 2, "include_final": True}, model=model,
                             optimizer=opt, total_steps=1)
    x = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        plain, windows = model(x), model(x, boundary=Windows(model, strategy.starts))
    for a, b in zip(plain, windows):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if name == "tiny":
        model.train()
        out = strategy.step(x, torch.tensor([0, 2]), 0)
        assert math.isfinite(out.loss) and out.exit_losses.shape == (model.num_exits,)


@pytest.mark.parametrize("overrides, message", [
    (["method.variant=nested"], "method.variant"),
    (["method.overlap=0"], "method.overlap"),
    (["method.cut=0"], "method.cut"),
    (["method.distill_co=-1"], "method.distill_co"),
    (["method.temperature=0"], "method.temperature"),
    (["method.window=3"], "method.window"),
    # tiny's default 4 stages: a cut after stage 4 cuts nothing
    (["method.variant=no_overlap", "method.cut=4", "data.name=digits", "data.image_size=8", "epochs=1"],
     "method.cut: the cut must fall between two of the 4 stages"),
])
def test_bad_parameters_are_one_line_exit_2(run_cli, tmp_path, overrides, message):
    from test_tune import one_line

    code, _, err = run_cli("train", "method=block-dependent", *overrides, f"out_dir={tmp_path / 'run'}")
    assert code == 2 and message in one_line(err), err


def test_resume_equals_uninterrupted(tmp_path):
    from test_surgery import resume_equals_uninterrupted

    full = resume_equals_uninterrupted(tmp_path, {"name": "block-dependent", "overlap": 2, "distill": True})
    assert len(full.epochs) == 2 and all(math.isfinite(e["loss"]) for e in full.epochs)


# --- two gloo workers (test_distributed's 3-exit tiny) ---------------------------------------------------

SCENARIOS = [{"overlap": 2}, {"variant": "local_error", "distill": True}, {"overlap": 2, "include_final": True}]


def _ranks(rank, shared, scratch):
    from test_distributed import BATCH, STEPS, _batches, _flat, _model, _strategy, _train

    from bench.config import validate_trial
    from bench.trial.workers import Workers

    share, results = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2), []
    for params in SCENARIOS:
        model = _model()
        strategy = _strategy("block-dependent", params, model, STEPS)
        cfg = {"batch_size": BATCH, "method": {"name": "block-dependent", **params}, "workers": {"count": 2}}
        Workers(validate_trial(cfg), "cpu").wrap(strategy, model)
        _train(strategy, model, _batches(STEPS), STEPS, share)
        results.append(_flat([model]))
    return results


def test_two_workers_of_half_batches_step_as_one_process_of_the_whole(tmp_path):
    from test_distributed import STEPS, _batches, _flat, _model, _strategy, _train, _two_ranks

    ranks = _two_ranks(_ranks, tmp_path)
    for i, params in enumerate(SCENARIOS):
        model = _model()
        start = _flat([model])
        _train(_strategy("block-dependent", params, model, STEPS), model, _batches(STEPS), STEPS)
        assert (_flat([model]) - start).abs().max() > 1e-3
        for rank in ranks:
            torch.testing.assert_close(rank[i], _flat([model]), rtol=0, atol=1e-5)
