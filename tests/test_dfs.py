"""`dfs` (Deep Feature Surgery): the partitioned gradients and the objective against forwards written out here
with their own detaches, bad parameters through the CLI, resume = uninterrupted, and two gloo workers."""

import math

import pytest
import torch
import torch.nn.functional as F
from toys import ChainNet

from bench.registry import METHODS, load_all

load_all()


def dfs_grads(model, x, y, **params):
    """The gradients one `dfs` step leaves (SGD at lr 0: the model stays as it was)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = METHODS.build("dfs", params, model=model, optimizer=opt, total_steps=1).step(x, y, 0)
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def hand_grads(model, x, y, keep, kd=None):
    """ChainNet's forward written out: head k reads h_k whole; stage k+1 reads h_k's first `keep` channels
    and the others detached (none after the last stage). kd: (T, gamma), MTLLoss with KDCrossEntropy."""
    model.zero_grad()
    K, h, logits = model.num_exits, x, []
    for k in range(K):
        h = torch.tanh(h @ model.stages[k].weight.T + model.stages[k].bias)
        logits.append(h @ model.heads[k].weight.T + model.heads[k].bias)
        if k < K - 1:
            h = torch.cat([h[:, :keep], h[:, keep:].detach()], 1)
    ce = [F.cross_entropy(z, y) for z in logits]
    if kd is None:
        loss = sum(ce)
    else:
        T, gamma = kd
        p = torch.softmax(logits[-1].detach() / T, 1)
        loss = ce[-1] + sum((1 - gamma) * ce[k] - gamma * (p * torch.log_softmax(logits[k] / T, 1)).sum(1).mean()
                            for k in range(K - 1))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("d, ratio, keep", [(4, 0.5, 2), (5, 0.5, 2), (5, 0.7, 4), (4, 0.25, 1)])
def test_gradients_are_the_partitioned_forwards(d, ratio, keep):
    """round(C * ratio) channels keep the deeper exits' gradient (Python's round: 2.5 -> 2, 3.5 -> 4)."""
    torch.manual_seed(0)
    model, x, y = ChainNet(K=3, d=d), torch.randn(6, d, dtype=torch.float64), torch.randint(0, 3, (6,))
    out, got = dfs_grads(model, x, y, ratio=ratio)
    loss, want = hand_grads(model, x, y, keep)
    assert out.loss == pytest.approx(loss, rel=1e-12)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)


def per_exit(model, x, y):
    """Each exit's CE gradient through the plain (undetached) network."""
    grads = []
    for k in range(model.num_exits):
        model.zero_grad()
        F.cross_entropy(model(x)[k], y).backward()
        grads.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                      for n, p in model.named_parameters()})
    return grads


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_two_exits_stage_one_rows_by_exit(ratio):
    """K = 2, d = 4: stage 1's output channel j is row j of its weight. Rows < round(4 ratio) get both exits'
    gradients, the others exit 1's alone; ratio 1 is the code's special case: head 1 reads sg(x), so stage 1
    gets exit 2's gradient only. Stage 2 and the heads get their plain gradients."""
    torch.manual_seed(1)
    model, x, y = ChainNet(K=2, d=4), torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    g1, g2 = per_exit(model, x, y)
    _, got = dfs_grads(model, x, y, ratio=ratio)
    keep = round(4 * ratio)
    for part in ("weight", "bias"):
        name = f"stages.0.{part}"
        if ratio == 1.0:
            want = g2[name]
        else:
            want = g1[name].clone()
            want[:keep] += g2[name][:keep]
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-14)
        for other in (f"stages.1.{part}", f"heads.0.{part}", f"heads.1.{part}"):
            torch.testing.assert_close(got[other], g1[other] + g2[other], rtol=1e-12, atol=1e-14)


def test_kd_objective_and_gradients():
    torch.manual_seed(2)
    model, x, y = ChainNet(K=3, d=4), torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    out, got = dfs_grads(model, x, y, kd=True)  # T = 3, gamma = 0.9 by default
    loss, want = hand_grads(model, x, y, 2, kd=(3.0, 0.9))
    assert out.loss == pytest.approx(loss, rel=1e-12)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)


def test_scope_head_partitions_what_the_head_reads():
    """A list state: the last tensor (MSDNet's coarsest scale); a dict: its top-level tensors; tokens [N, T, D]:
    the last axis. scope all: every tensor."""
    from methods.dfs import partition

    fine = torch.randn(2, 4, 3, 3)
    base = torch.randn(2, 6, 2, 2, requires_grad=True)
    head, nxt = partition([fine, base * 1.0], 0.5, "head")
    assert head[0] is fine and nxt[0] is fine
    torch.testing.assert_close(nxt[1], base)
    nxt[1].sum().backward()
    assert base.grad[:, :3].eq(1).all() and base.grad[:, 3:].eq(0).all()
    tokens = torch.randn(2, 5, 4, requires_grad=True)
    _, nxt = partition(tokens * 1.0, 0.5, "head")
    nxt.sum().backward()
    assert tokens.grad[..., :2].eq(1).all() and tokens.grad[..., 2:].eq(0).all()
    x = torch.randn(2, 4, requires_grad=True)
    inputs = torch.randn(2, 4, requires_grad=True)
    head, nxt = partition({"x": x * 1.0, "inputs": [inputs * 1.0], "feats": []}, 0.5, "head")
    (nxt["x"].sum() + nxt["inputs"][0].sum()).backward()
    assert x.grad[:, :2].eq(1).all() and x.grad[:, 2:].eq(0).all() and inputs.grad.eq(1).all()
    inputs.grad = None
    _, nxt = partition({"x": x * 1.0, "inputs": [inputs * 1.0]}, 0.5, "all")
    nxt["inputs"][0].sum().backward()
    assert inputs.grad[:, :2].eq(1).all() and inputs.grad[:, 2:].eq(0).all()


@pytest.mark.parametrize("name, values", [("tiny", {"widths": [4, 6]}), ("msdnet-cifar-budget", {}),
                                          ("ranet-cifar", {})])
def test_forward_unchanged_on_backbone_families(name, values):
    from bench import backbones

    torch.manual_seed(3)
    size = 8 if name == "tiny" else 32
    model = backbones.build({"name": name, **values}, 3, 3, size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = METHODS.build("dfs", {}, model=model, optimizer=opt, total_steps=1)
    x = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        plain, cut = model(x), model(x, boundary=strategy.boundary)
    for a, b in zip(plain, cut):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if name == "tiny":
        model.train()
        out = strategy.step(x, torch.tensor([0, 2]), 0)
        assert math.isfinite(out.loss) and out.exit_losses.shape == (model.num_exits,)


@pytest.mark.parametrize("overrides, message", [
    (["method.ratio=2"], "method.ratio"),
    (["method.ratio=-0.1"], "method.ratio"),
    (["method.scope=coarsest"], "method.scope"),
    (["method.temperature=0"], "method.temperature"),
    (["method.gamma=1.5"], "method.gamma"),
    (["method.use_fr=0"], "method.use_fr"),
])
def test_bad_parameters_are_one_line_exit_2(run_cli, tmp_path, overrides, message):
    from test_tune import one_line

    code, _, err = run_cli("train", "method=dfs", *overrides, f"out_dir={tmp_path / 'run'}")
    assert code == 2 and message in one_line(err), err
    assert not (tmp_path / "run").exists()


def test_resume_equals_uninterrupted(tmp_path):
    from test_surgery import resume_equals_uninterrupted

    full = resume_equals_uninterrupted(tmp_path, {"name": "dfs", "kd": True})
    assert len(full.epochs) == 2 and all(math.isfinite(e["loss"]) for e in full.epochs)


# --- two gloo workers ---------------------------------------------------------------------------------------

SCENARIOS = [("dfs", {}), ("dfs", {"kd": True, "ratio": 0.25})]


def _ranks(rank, shared, scratch):
    from test_distributed import BATCH, STEPS, _batches, _flat, _model, _strategy, _train

    from bench.config import validate_trial
    from bench.trial.workers import Workers

    share, results = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2), []
    for name, params in SCENARIOS:
        model = _model()
        strategy = _strategy(name, params, model, STEPS)
        Workers(validate_trial({"batch_size": BATCH, "method": {"name": name, **params}, "workers": {"count": 2}}),
                "cpu").wrap(strategy, model)
        _train(strategy, model, _batches(STEPS), STEPS, share)
        results.append(_flat([model]))
    return results


def test_two_workers_of_half_batches_step_as_one_process_of_the_whole(tmp_path):
    from test_distributed import STEPS, _batches, _flat, _model, _strategy, _train, _two_ranks

    ranks = _two_ranks(_ranks, tmp_path)
    for i, (name, params) in enumerate(SCENARIOS):
        model = _model()
        start = _flat([model])
        _train(_strategy(name, params, model, STEPS), model, _batches(STEPS), STEPS)
        assert (_flat([model]) - start).abs().max() > 1e-3
        for rank in ranks:
            torch.testing.assert_close(rank[i], _flat([model]), rtol=0, atol=1e-5)
