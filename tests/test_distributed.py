"""One trial on several workers (bench/trial/distributed.py, bench/trial/workers.py).

Math: two gloo processes (torch.multiprocessing, no Ray) run the strategies through `Workers`, the seam
bench.trial.train.run gives every rank; the results are compared with one process on the whole batch (every strategy
kept to one process's math on the global batch), with L2W-DEN's DDP rule written out here
(each rank's pseudo step on its own half batch, the WPN meta-gradient averaged) and with Boosted's
train_imagenet.py rule (loss_equal's averages per rank). Ray: sweeps and `exitbench train` with 2-worker trials
on the shared local Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from torch.func import functional_call

from bench import backbones
from bench.registry import METHODS, load_all

BATCH, STEPS = 64, 2
OPTIM = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
L2W = dict(meta_grad="exact", wpn_hidden=32, epsilon=0.8, normalize="col")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return backbones.build({"name": "tiny", "widths": [8, 12, 16]}, 10, 1, 8)


def _batches(steps: int, n: int = BATCH):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(steps)]


def _strategy(name, params, model, steps, steps_per_epoch=None):
    from bench.readout import build_readout

    load_all()
    readout = build_readout({"name": name, **params}, model.num_exits, 10)
    opt = torch.optim.SGD(model.parameters(), **OPTIM)
    return METHODS.build(name, params, model=model, optimizer=opt, total_steps=steps,
                         steps_per_epoch=steps_per_epoch or steps, readout=readout)


# Strategies kept to one process's math on the global batch (their references' nn.DataParallel or one device;
# ztw's Accelerate DDP and every mean-over-samples objective agree): two workers on half batches are one
# process on the whole batch.
# (name, params, steps, steps per epoch); an epoch's end runs after its last step (Meta-GF's fusion pass).
# ztw: one epoch of cascade training, then one of ensembles; byot's hint weighted up to matter at 1e-5.
ONE_PROCESS = [("uniform", {}, STEPS, STEPS), ("ge", {}, STEPS, STEPS), ("distill", {"temperature": 3.0}, STEPS, STEPS),
               ("pcgrad", {}, STEPS, STEPS), ("cagrad", {}, STEPS, STEPS), ("kd-anneal", {"maxprob": 0.05}, 3, 3),
               ("byot", {"beta": 0.05}, STEPS, STEPS), ("boosted", {}, STEPS, STEPS), ("ztw", {}, 2, 1),
               ("meta-gf", {}, STEPS, STEPS)]
BOOSTED_EQUAL = {"ge": False, "loss_equal": True}


def _train(strategy, model, batches, steps_per_epoch, rank_share=slice(None)):
    """The strategy's steps on `batches` (this share of each), model in eval mode (BatchNorm on running
    statistics: per sample, so a split batch gives the same update); the epochs' ends after their last step.
    Returns what each step reported."""
    model.eval()
    outs = []
    for i, (x, y) in enumerate(batches):
        outs.append(strategy.step(x[rank_share], y[rank_share], i))
        if (i + 1) % steps_per_epoch == 0:
            start = i + 1 - steps_per_epoch
            strategy.end_epoch(i // steps_per_epoch, [(bx[rank_share], by[rank_share])
                                                     for bx, by in batches[start:i + 1]])
    return outs


def _trained(strategy, model):
    """Everything a step may change: the model, the strategy's readout and its own learned tensors."""
    nets = [model, strategy.readout]
    if getattr(strategy, "projections", None) is not None:
        nets.append(strategy.projections)
    flat = _flat(nets)
    if hasattr(strategy, "alpha"):  # Meta-GF's fusion weights of the tensors two or more exits reach (of the
        # others the gradient is 0 but for rounding, which Adam's normalisation magnifies; they fuse nothing)
        flat = torch.cat([flat, strategy.alpha.detach()[:, strategy.reach.sum(0) >= 2].reshape(-1)])
    return flat


def _flat(modules) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(scenarios, out) -> list[dict]:
    """`scenarios(rank)` on two gloo ranks (fresh processes); what each rank returned."""
    mp.spawn(_joined, args=(scenarios, _free_port(), str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _joined(rank: int, scenarios, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix=f"rank{rank}-") as scratch:  # the ranks' shared folder: `out`
        torch.save(scenarios(rank, Path(out), Path(scratch)), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _rank(rank: int, shared: Path, scratch: Path) -> dict:
    """Every scenario on this rank's half of each global batch."""
    from bench.config import validate_trial
    from bench.trial.workers import Workers

    results = {}
    share = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)

    def workers(name, params, model, steps, steps_per_epoch=None):
        strategy = _strategy(name, params, model, steps, steps_per_epoch)
        if rank == 1:  # rank 0's start must reach every rank: the readout's and what a strategy builds later
            with torch.no_grad():
                for p in strategy.readout.parameters():
                    p.add_(torch.randn_like(p))
            torch.manual_seed(1234)
        group = Workers(validate_trial({"batch_size": BATCH, "method": name, "workers": {"count": 2}}), "cpu")
        group.wrap(strategy, model)
        return strategy

    for name, params, steps, per_epoch in ONE_PROCESS:
        model = _model()
        strategy = workers(name, params, model, steps, per_epoch)
        outs = _train(strategy, model, _batches(steps), per_epoch, share)
        results[name] = _trained(strategy, model)
        results[f"{name}-extras"] = [o.extras for o in outs]
    for params, steps in ((L2W, 1), (L2W, 3), (dict(L2W, meta_grad="jvp"), 1)):
        model = _model()
        strategy = workers("l2w", params, model, steps)
        for i, (x, y) in enumerate(_batches(steps)):
            strategy.step(x[share], y[share], i)
        results[f"l2w-{params['meta_grad']}-{steps}"] = _flat([model, strategy.wpn])
    # Boosted's loss_equal: each rank's own averages; a checkpoint keeps both, and each rank resumes its own
    model = _model()
    strategy = workers("boosted", BOOSTED_EQUAL, model, STEPS)
    _train(strategy, model, _batches(STEPS), STEPS, share)
    state = strategy.state_dict()
    resumed = _strategy("boosted", BOOSTED_EQUAL, _model(), STEPS)
    resumed.load_state_dict(state)
    Workers(validate_trial({"batch_size": BATCH, "method": "boosted", "workers": {"count": 2}}), "cpu").wrap(
        resumed, resumed.model)
    results["boosted-equal"] = _flat([model])
    results["boosted-equal-state"] = (state["loss_ema"], state["loss_ema_ranks"], resumed.loss_ema)
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _two_ranks(_rank, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize("name, params, steps, per_epoch", ONE_PROCESS, ids=[c[0] for c in ONE_PROCESS])
def test_two_workers_of_half_batches_step_as_one_process_of_the_whole(two_ranks, name, params, steps, per_epoch):
    model = _model()
    strategy = _strategy(name, params, model, steps, per_epoch)
    start = _flat([model])
    outs = _train(strategy, model, _batches(steps), per_epoch)
    one = _trained(strategy, model)
    assert (_flat([model]) - start).abs().max() > 1e-3  # the steps did something
    for rank in two_ranks:
        torch.testing.assert_close(rank[name], one, rtol=0, atol=1e-5)
        for theirs, ours in zip(rank[f"{name}-extras"], outs):  # kd-anneal's T and the teacher's max-probability
            assert theirs.keys() == ours.extras.keys()
            assert theirs == pytest.approx(ours.extras, abs=1e-6)
    if name == "kd-anneal":  # T moved, by the global batch's statistic
        assert outs[-1].extras["temperature"] > 1.0


def test_boosted_loss_equal_on_two_workers_is_train_imagenet_rule(two_ranks):
    """Boosted's train_imagenet.py under DDP, written out: each rank's loss_equal averages from its own losses
    (`meter.update(loss.item())`), its objective sum_k loss_k / ema_k * mean(ema) on its share, the model's
    gradient the ranks' mean (DDP), one SGD step; a checkpoint keeps both ranks' averages."""
    model = _model()
    model.eval()
    opt = torch.optim.SGD(model.parameters(), **OPTIM)
    emas: list[list[float] | None] = [None, None]
    for x, y in _batches(STEPS):
        grads = []
        for r in range(2):
            xs, ys = x[r * 32:(r + 1) * 32], y[r * 32:(r + 1) * 32]
            outputs, carry = [], None
            for z in model(xs):
                carry = z if carry is None else z + 0.5 * carry.detach()
                outputs.append(carry)
            loss = [F.cross_entropy(o, ys) for o in outputs]
            values = [float(v.detach()) for v in loss]
            emas[r] = values if emas[r] is None else [0.9 * e + 0.1 * v for e, v in zip(emas[r], values)]
            mean = sum(emas[r]) / len(emas[r])
            objective = sum(v / e * mean for v, e in zip(loss, emas[r]))
            grads.append(torch.autograd.grad(objective, list(model.parameters())))
        for p, *per_rank in zip(model.parameters(), *grads):
            p.grad = sum(per_rank) / 2
        opt.step()
        opt.zero_grad()
    assert emas[0] != pytest.approx(emas[1])  # the ranks' averages differ, so the rule is per rank
    for r, rank in enumerate(two_ranks):
        torch.testing.assert_close(rank["boosted-equal"], _flat([model]), rtol=0, atol=1e-5)
        own, every, resumed = rank["boosted-equal-state"]
        assert own == pytest.approx(emas[r], abs=1e-6) and resumed == pytest.approx(emas[r], abs=1e-6)
        assert all(theirs == pytest.approx(ours, abs=1e-6) for theirs, ours in zip(every, emas, strict=True))


# The engine (bench.trial.train.run) on two gloo ranks, training mode and per-rank BatchNorm statistics as in a real
# trial: every strategy keeps its ranks' parameters identical through a whole run, its epochs' ends included.
ENGINE = {name: {"method": name} for name in ("pcgrad", "cagrad", "kd-anneal", "byot", "ztw", "meta-gf")}
ENGINE["boosted"] = {"method": {"name": "boosted", "loss_equal": True}}
ENGINE["meta-gf-disjoint"] = {"method": "meta-gf", "regime": {"name": "disjoint"}}  # frozen backbone in phase 2
ENGINE["pcgrad-mixed"] = {"method": "pcgrad", "regime": {"name": "mixed"}}
ENGINE["pcgrad-disjoint"] = {"method": "pcgrad", "regime": {"name": "disjoint"}}  # eval-mode BatchNorm, no_sync


class _Interrupted(Exception):
    pass


def _interrupt_after(epoch: int):
    def on_epoch(row, run_dir):  # called on every rank once the epoch's checkpoint is written
        if row["epoch"] == epoch:
            raise _Interrupted

    return on_epoch


def _engine_rank(rank: int, shared: Path, scratch: Path) -> dict:
    from test_tune import TINY

    from bench.config import validate_trial
    from bench.trial import train
    from bench.trial.workers import Workers

    class Keep(Workers):  # every rank's checkpoint state, which only rank 0 writes
        def save(self, path, state):
            self.state = state
            super().save(path, state)

    import torch.distributed as dist

    results = {}
    for name, trial in ENGINE.items():
        cfg = validate_trial({**TINY, **trial, "epochs": 3, "workers": {"count": 2}, "progress": False})
        group = Keep(cfg, "cpu")
        record = train.run(cfg, scratch / name, group=group)
        params = [n for n, _ in backbones.build(cfg.backbone, 4, 1, 8).named_parameters()]  # not the buffers
        results[name] = {
            "params": torch.cat([group.state["model"][n].reshape(-1) for n in params]),
            "buffers": torch.cat([t.reshape(-1).double() for n, t in group.state["model"].items() if n not in params]),
            "readout": [t.clone() for t in group.state["readout"].values()],
            "strategy": group.state["strategy"], "epochs": [e["loss"] for e in record.epochs],
            "exits": [e["top1"] for e in record.exits]}
        # The same run stopped after epoch 2 and resumed from rank 0's checkpoint on both ranks (as Ray Train's
        # worker copies it into each rank's folder)
        stopped = scratch / f"{name}-stopped"
        try:
            train.run(cfg, stopped, group=Keep(cfg, "cpu"), on_epoch=_interrupt_after(2))
        except _Interrupted:
            pass
        if rank == 0:
            shutil.copy(stopped / train.CHECKPOINT, shared / f"{name}.pt")
        dist.barrier()
        shutil.copy(shared / f"{name}.pt", stopped / train.CHECKPOINT)
        again = Keep(cfg, "cpu")
        record = train.run(cfg, stopped, group=again, resume=True)
        results[name]["resumed"] = torch.cat([again.state["model"][n].reshape(-1) for n in params])
        results[name]["resumed_exits"] = [e["top1"] for e in record.exits]
    return results


@pytest.fixture(scope="module")
def two_engine_ranks(tmp_path_factory):
    return _two_ranks(_engine_rank, tmp_path_factory.mktemp("engine"))


@pytest.mark.parametrize("name", list(ENGINE))
def test_every_strategy_keeps_its_ranks_identical_through_the_engine(two_engine_ranks, name):
    first, second = (rank[name] for rank in two_engine_ranks)
    method = name.split("-disjoint")[0].split("-mixed")[0]
    for rank in (first, second):  # a two-phase regime's configured strategy is its phase 2
        rank["strategy"] = rank["strategy"].get("phase2", rank["strategy"])
    assert torch.equal(first["params"], second["params"])
    assert all(torch.equal(a, b) for a, b in zip(first["readout"], second["readout"], strict=True))
    assert first["epochs"] == second["epochs"] and first["exits"] == second["exits"]  # reduced; rank 0's evaluation
    assert len(first["epochs"]) == 3 and all(0 <= t <= 100 for t in first["exits"])
    for rank in (first, second):  # stopped after epoch 2 and resumed: the uninterrupted run's parameters
        assert torch.equal(rank["resumed"], rank["params"]) and rank["resumed_exits"] == rank["exits"]
    if method == "boosted":  # loss_equal's averages are per rank (train_imagenet.py), both kept
        ema = first["strategy"]["loss_ema_ranks"]
        assert ema == second["strategy"]["loss_ema_ranks"] and ema[0] != ema[1]
    if method == "meta-gf":  # and the model's BatchNorm statistics: rank 0's after each fusion pass
        assert torch.equal(first["strategy"]["alpha"], second["strategy"]["alpha"])
        assert torch.equal(first["buffers"], second["buffers"])
    if method == "kd-anneal":
        assert first["strategy"]["temperature"] == second["strategy"]["temperature"]


def test_l2w_ranks_stay_identical(two_ranks):
    assert torch.equal(two_ranks[0]["l2w-exact-3"], two_ranks[1]["l2w-exact-3"])


def _allocate(conf: torch.Tensor, probs: list[float]) -> torch.Tensor:
    """L2W-DEN's exit allocation on one rank's meta half: exit k takes the floor(n q_k) most confident samples
    left, the last exit the rest."""
    n, K = conf.shape
    exit_of, free = torch.full((n,), K - 1), torch.ones(n, dtype=torch.bool)
    for k in range(K - 1):
        order = [i for i in torch.argsort(conf[:, k], descending=True, stable=True).tolist() if free[i]]
        chosen = order[:int(n * probs[k])]
        exit_of[chosen], free[chosen] = k, False
    return exit_of


def test_l2w_step_on_two_workers_is_l2w_den_ddp_rule(two_ranks):
    """One L2W step written out: per half, each rank's pseudo SGD step on its own training half, its meta loss
    on its own meta half at the pseudo parameters, the WPN's gradient averaged over the ranks (one Adam step),
    then the backbone's real gradients averaged (one SGD step)."""
    from methods.l2w import WeightPredictor

    model = _model()
    K = model.num_exits
    wpn = WeightPredictor(K, K, L2W["wpn_hidden"])  # as the strategy builds it: next in the model's stream
    opt = torch.optim.SGD(model.parameters(), **OPTIM)
    meta_opt = torch.optim.Adam(wpn.parameters(), lr=1e-4, weight_decay=1e-4)
    q = 15 / 20
    probs = [q ** k for k in range(1, K + 1)]
    probs = [p / sum(probs) for p in probs]
    names = [n for n, _ in model.named_parameters()]
    x, y = _batches(1)[0]
    shares = [(x[:32], y[:32]), (x[32:], y[32:])]

    def weights(losses):
        t = wpn(losses.detach())
        return 1 + L2W["epsilon"] * (t - t.mean(1, keepdim=True))

    def at(theta, inputs):
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.track_running_stats = False
        try:
            return functional_call(model, theta, (inputs,))
        finally:
            for m in norms:
                m.track_running_stats = True

    model.train()
    for half in range(2):
        theta = dict(model.named_parameters())
        meta_grads = []
        for xs, ys in shares:
            (x_tr, x_me), (y_tr, y_me) = xs.chunk(2), ys.chunk(2)
            if half:
                (x_tr, x_me), (y_tr, y_me) = (x_me, x_tr), (y_me, y_tr)
            losses = torch.stack([F.cross_entropy(z, y_tr, reduction="none") for z in at(theta, x_tr)], 1)
            g = torch.autograd.grad((weights(losses) * losses).mean(0).sum(), list(theta.values()), create_graph=True)
            pseudo = {}
            for name, p, gi in zip(names, theta.values(), g):
                d = gi + OPTIM["weight_decay"] * p.detach()
                buf = opt.state.get(p, {}).get("momentum_buffer")
                step = d if buf is None else OPTIM["momentum"] * buf + d
                pseudo[name] = p.detach() - OPTIM["lr"] * step
            meta_logits = at(pseudo, x_me)
            conf = torch.stack([F.softmax(z, 1).amax(1) for z in meta_logits], 1).detach()
            exit_of = _allocate(conf, probs)
            meta = sum(F.cross_entropy(meta_logits[k][exit_of == k], y_me[exit_of == k])
                       for k in range(K) if (exit_of == k).any())
            meta_grads.append(torch.autograd.grad(meta, list(wpn.parameters())))
        for p, *per_rank in zip(wpn.parameters(), *meta_grads):
            p.grad = sum(per_rank) / 2
        meta_opt.step()
        meta_opt.zero_grad()
        real = []
        for xs, ys in shares:
            x_tr, y_tr = (xs.chunk(2)[half], ys.chunk(2)[half])
            losses = torch.stack([F.cross_entropy(z, y_tr, reduction="none") for z in model(x_tr)], 1)
            with torch.no_grad():
                w = weights(losses)
            real.append(torch.autograd.grad((w * losses).mean(0).sum(), list(model.parameters())))
        for p, *per_rank in zip(model.parameters(), *real):
            p.grad = sum(per_rank) / 2
        opt.step()
        opt.zero_grad()
    expected = _flat([model, wpn])
    assert (expected - two_ranks[0]["l2w-exact-1"]).abs().max() < 1e-5
    assert (expected - two_ranks[1]["l2w-jvp-1"]).abs().max() < 1e-5  # forward mode: the same meta-gradient
    assert (_flat([model]) - _flat([_model()])).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Ray: sweeps and `exitbench train` with a 2-worker trial (gloo, half a CPU per worker on the shared Ray)

TWO = {"count": 2, "cpu": 0.5}


@pytest.mark.slow
def test_sweep_of_a_two_worker_and_a_one_worker_trial_with_asha_frees_the_workers(ray_session, run_cli, tmp_path):
    """Both kinds of trial run and are stored; ASHA stops the 2-worker trial with lr 1e-6 at its first rung
    (the first trial, 2 workers at lr 0.2, set the rung), and its worker group's placement group is gone with it
    (ray#54305): every CPU is free at the end. The 1-worker trials run after it; ASHA may stop them too."""
    from ray.util import placement_group_table
    from test_tune import TINY, sweep_file

    from bench import results

    path = sweep_file(tmp_path, "ddp", base=dict(TINY, epochs=3, workers={"cpu": 0.5}), seeds=[0],
                      grid={"workers.count": [2, 1], "optim.lr": [0.2, 1e-6]},
                      search={"scheduler": "asha", "metric": "loss", "mode": "min"})
    code, out, err = run_cli("sweep", path, "--quiet")
    assert code == 0, out + err
    runs = results.load(tmp_path / "runs" / "ddp").runs.set_index(["config.workers.count", "config.optim.lr"])
    assert runs.loc[(2, 0.2), "status"] == "finished" and runs.loc[(2, 1e-6), "status"] == "stopped"
    assert set(runs.loc[1, "status"]) <= {"finished", "stopped"} and len(runs) == 4
    record = results.load_record(tmp_path / "runs" / "ddp", runs.loc[(2, 0.2), "trial_id"])
    assert record.config["workers"]["count"] == 2 and len(record.epochs) == 3 and record.exits[-1]["top1"] >= 0
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())
    assert ray_session.available_resources().get("CPU") == ray_session.cluster_resources()["CPU"]


@pytest.mark.slow
def test_killed_driver_resumes_the_distributed_trial_from_its_checkpoint(ray_session, run_cli, tmp_path):
    """SIGKILL the sweep driver (its own Ray) while the 2-worker trial is mid-way; `--resume` on the shared Ray
    continues it from its checkpoint and ends where `exitbench train` of the same trial on 2 workers ends."""
    import signal

    from test_tune import TINY, _driver, _kill_group, _wait_for, sweep_file

    from bench import results

    base = dict(TINY, data=dict(TINY["data"], train_size=400), epochs=4, workers=TWO)
    path = sweep_file(tmp_path, "killed", base=base, grid={}, seeds=[0])
    sweep_dir = tmp_path / "runs" / "killed"
    driver = _driver([path])
    try:
        _wait_for(lambda: list(sweep_dir.glob("*_*/checkpoint_00000[0-9]")), driver, "a checkpoint", timeout=300)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        _kill_group(driver.pid)
    assert not list((sweep_dir / "store" / "records").glob("*.json"))  # killed mid-way
    code, out, err = run_cli("sweep", "--resume", str(sweep_dir), "--quiet")
    assert code == 0, out + err
    tables = results.load(sweep_dir)
    assert tables.runs["status"].tolist() == ["finished"]
    assert next(sweep_dir.glob("*_*/checkpoint_resume/checkpoint.pt")).is_file()  # continued, not restarted
    run_dir = tmp_path / "clean"
    trial = json.loads(json.dumps(results.load_record(sweep_dir, tables.runs["trial_id"][0]).config))
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump({**trial, "out_dir": str(run_dir)}))
    code, out, err = run_cli("train", config)
    assert code == 0, out + err
    clean = json.loads((run_dir / "result.json").read_text())
    losses = tables.epochs.sort_values("epoch")["loss"].tolist()
    assert losses == pytest.approx([e["loss"] for e in clean["epochs"]], rel=1e-6)
    assert tables.exits.sort_values("exit")["top1"].tolist() == [e["top1"] for e in clean["exits"]]


@pytest.mark.slow
def test_two_worker_trial_across_two_ray_nodes_ends_as_on_one(ray_session, run_cli, tmp_path):
    """A Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster: head 3 CPUs, a second node 2 CPUs;
    nothing is shared but the file system, as on real nodes with shared storage): a sweep driven through
    `--address` whose trial has 2 workers x 2 CPUs, which only the two nodes together can place (the head
    holds one worker and the trial's driver). Its numbers equal the same trial's on the suite's one-node Ray."""
    import subprocess
    import sys

    from ray.cluster_utils import Cluster
    from test_tune import TINY, sweep_file

    from bench import results

    base = dict(TINY, threads=1, workers={"count": 2, "cpu": 2})
    path = sweep_file(tmp_path, "nodes", base=base, grid={"method": ["pcgrad"]}, seeds=[0])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        done = subprocess.run([sys.executable, "-m", "bench", "sweep", str(path), "--address", cluster.address,
                               "--quiet"], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    finally:
        cluster.shutdown()
    assert done.returncode == 0, done.stdout + done.stderr
    tables = results.load(tmp_path / "runs" / "nodes")
    assert tables.runs["status"].tolist() == ["finished"]
    trial = json.loads(json.dumps(results.load_record(tmp_path / "runs" / "nodes", tables.runs["trial_id"][0]).config))
    config = tmp_path / "one-node.yaml"  # 2 workers x 1 CPU fit this machine; one thread each either way
    config.write_text(yaml.safe_dump({**trial, "workers": {"count": 2, "cpu": 1}, "out_dir": str(tmp_path / "one")}))
    code, out, err = run_cli("train", config)
    assert code == 0, out + err
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert tables.epochs.sort_values("epoch")["loss"].tolist() == [e["loss"] for e in one["epochs"]]
    assert tables.exits.sort_values("exit")["top1"].tolist() == [e["top1"] for e in one["exits"]]


@pytest.mark.parametrize("overrides, message", [
    (["workers.count=0"], "workers.count: Input should be greater than or equal to 1"),
    (["workers.count=2", "batch_size=63"], "batch_size=63 is the global batch and must split evenly over "
                                           "workers.count=2"),
    (["workers.count=2", "method=l2w", "workers.sync_bn=true", "workers.gpu=1"], "workers.sync_bn: method 'l2w'"),
    (["workers.count=2", "workers.sync_bn=true"], "workers.sync_bn: torch's SyncBatchNorm runs on GPUs only"),
    (["workers.count=2", "workers.cpu=64"], "workers: 2 x (cpu=64, gpu=0) is more than this machine has"),
])
def test_bad_worker_settings_are_one_line_exit_2(run_cli, tmp_path, overrides, message):
    from test_tune import one_line

    code, out, err = run_cli("train", *overrides, f"out_dir={tmp_path / 'run'}")
    assert code == 2 and message in one_line(err), err
    assert not (tmp_path / "run").exists()


def test_a_plugin_strategy_not_made_for_ddp_is_refused_on_several_workers(run_cli, fresh_registries, tmp_path):
    """Every built-in strategy runs on several workers; a plug-in one must say so (`distributed = True`)."""
    from test_tune import one_line

    (tmp_path / "plugin_plain.py").write_text(
        "from bench.registry import METHODS, Params\nfrom methods.base import Strategy\n\n\n"
        "@METHODS.register('plain-plug', Params)\nclass Plain(Strategy):\n    \"\"\"A plugin method.\"\"\"\n")
    code, out, err = run_cli("--include", tmp_path / "plugin_plain.py", "train", "workers.count=2",
                             "method=plain-plug", f"out_dir={tmp_path / 'run'}")
    assert code == 2 and "method 'plain-plug' does not run on several workers" in one_line(err), err
    assert all(name in one_line(err) for name in ("pcgrad", "cagrad", "meta-gf", "ztw", "boosted", "byot",
                                                  "kd-anneal", "l2w", "uniform"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["base.workers.count=2", "base.workers.cpu=2"], "workers: 2 x (cpu=2, gpu=0) plus the trial's driver (0.1 CPU) "
                                                     "is more than"),  # this machine, or the suite's Ray, has
    (["base.workers.count=2", "base.device=cuda"], "device=cuda with workers.count > 1 needs workers.gpu > 0"),
])
def test_bad_distributed_sweeps_are_one_line_exit_2(run_cli, tmp_path, monkeypatch, overrides, message):
    from test_tune import TINY, one_line, sweep_file

    from bench.sweep import cluster

    monkeypatch.setattr(cluster, "local_machine", lambda: {"CPU": 2.0, "GPU": 0.0})
    path = sweep_file(tmp_path, "bad", base=TINY, grid={}, seeds=[0])
    code, out, err = run_cli("sweep", path, *overrides, "--quiet")
    assert code == 2 and message in one_line(err), err
    assert not (tmp_path / "runs" / "bad").exists()
