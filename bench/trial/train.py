"""The trial loop: config -> data -> backbone -> strategy -> epochs -> evaluation -> one ResultRecord.

`run(cfg, run_dir)` is the whole trial. It runs standalone (`exitbench train`), inside a Ray Tune trial
(bench.sweep.runner passes `on_epoch` to report metrics and checkpoints) and on every rank of a DDP worker
group (bench.trial.distributed passes its `group`). It writes the run folder that bench.runfolder names.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import backbones, datasets
from bench.config import OptimConfig, ScheduleConfig, TrialConfig, resolve_device, to_yaml
from bench.errors import UsageError
from bench.evaluate.batches import exit_accuracy
from bench.evaluate.protocol import evaluate_model
from bench.results import ResultRecord, atomic_write_text
from bench.runfolder import CHECKPOINT, CONFIG, LOGITS, METRICS, RESULT
from bench.trial.files import check_resumable, load_checkpoint, save_checkpoint
from bench.trial.provenance import git_commit, machine, package_versions
from bench.trial.regime import Regime


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and iteration."""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(cfg: ScheduleConfig, iteration: int, total: int, steps_per_epoch: int) -> float:
    """LR multiplier at `iteration` (0-based) of `total`: optional linear warm-up, then the schedule.

    multistep drops at whole epochs (MSDNet: x0.1 at 50 % and 75 % of the epochs); cosine is
    per-iteration, 0.5 * (1 + cos(pi * t / T)), as L2W-DEN's adjust_learning_rate.
    """
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if iteration < warmup:
        return (iteration + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * iteration / total))
    epochs = total // steps_per_epoch
    epoch = iteration // steps_per_epoch
    drops = sum(epoch >= m * epochs for m in cfg.milestones)  # MSDNet: epoch // (epochs * m)
    return cfg.gamma**drops


def _rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "gauss": gauss},
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_model_state(model: torch.nn.Module, state: Any, path: Path) -> None:
    """`model.load_state_dict(state)`, with the first key or shape that does not fit named in one line."""
    own = model.state_dict()
    if not isinstance(state, dict):
        raise UsageError(f"checkpoint {str(path)!r} does not fit the configured backbone: its model is a "
                         f"{type(state).__name__}, not a state dict")
    for key, value in own.items():
        if key not in state:
            raise UsageError(f"checkpoint {str(path)!r} does not fit the configured backbone: it has no {key!r} "
                             f"(shape {list(value.shape)}); was it written for another backbone config?")
        theirs = getattr(state[key], "shape", None)
        if theirs is None or tuple(theirs) != tuple(value.shape):
            raise UsageError(f"checkpoint {str(path)!r} does not fit the configured backbone: {key!r} has shape "
                             f"{list(theirs) if theirs is not None else type(state[key]).__name__} in the "
                             f"checkpoint, {list(value.shape)} in the model")
    extra = sorted(set(state) - set(own))
    if extra:
        raise UsageError(f"checkpoint {str(path)!r} does not fit the configured backbone: it has {extra[0]!r}, "
                         f"which the model does not")
    model.load_state_dict(state)


EpochCallback = Callable[[dict[str, Any], Path], None]


class OneProcess:
    """The trial's place in a worker group, as `run` uses it: here a group of one, where every hook is the
    identity. bench.trial.workers.Workers is the same seam for one rank of several DDP workers."""

    def shard(self, bundle):
        """The data this process trains on (all of it)."""
        return bundle

    def wrap(self, strategy, model) -> None:
        """Train through a wrapper of `model` (DDP); one process trains through the model itself."""

    def begin_epoch(self, epoch: int) -> None:
        """Before each epoch's batches (a sampler's epoch; per-rank random streams)."""

    def sum(self, *values):
        """Per-process sums of the epoch (losses, correct counts, samples) summed over the group."""
        return values

    def first(self, fn, *args, **kwargs):
        """`fn` evaluated once (on the first process) and its value given to every process."""
        return fn(*args, **kwargs)

    def save(self, path: Path, state: dict[str, Any]) -> None:
        """The checkpoint, written once."""
        save_checkpoint(path, state)


@dataclass
class TrialParts:
    """What a trial trains, as `build_trial` makes it."""

    bundle: Any  # the data (bench.datasets' bundle; its training loader this process's share)
    model: torch.nn.Module
    readout: Any  # bench.readout.Readout
    optimizer: torch.optim.Optimizer
    regime: Regime
    strategy: Any  # methods.base.Strategy (or the regime's phased pair)
    steps_per_epoch: int
    total_steps: int


def build_trial(cfg: TrialConfig, device: torch.device, group: OneProcess | None = None) -> TrialParts:
    """Data, backbone, readout, optimiser, regime and strategy of a trial, in the engine's order (the seeded
    random stream each draws from depends on it; seed first). `group`: this process's share of the data."""
    from bench.readout import build_readout

    bundle = (group or OneProcess()).shard(datasets.build(cfg.data, cfg.batch_size, seed=cfg.seed, device=device))
    model = backbones.build(cfg.backbone, bundle.num_classes, bundle.in_channels, bundle.image_size).to(device)
    readout = build_readout(cfg.method, model.num_exits, bundle.num_classes).to(device)
    steps_per_epoch = len(bundle.train)
    if steps_per_epoch == 0:
        raise UsageError(f"the training split has {bundle.info.get('train_size')} samples: fewer than one batch")
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(cfg.optim, model)
    regime = Regime(cfg.regime, cfg.epochs, steps_per_epoch)  # joint, or two phases (bench/trial/regime.py)
    strategy = regime.build_strategy(cfg.method, model=model, optimizer=optimizer, total_steps=total_steps,
                                     steps_per_epoch=steps_per_epoch, device=device, amp=cfg.amp, readout=readout)
    return TrialParts(bundle, model, readout, optimizer, regime, strategy, steps_per_epoch, total_steps)


def run(cfg: TrialConfig, run_dir: str | Path | None = None, *, on_epoch: EpochCallback | None = None,
        resume: bool = True, trial_id: str | None = None, sweep: str | None = None,
        group: OneProcess | None = None) -> ResultRecord:
    """Train and evaluate one trial; returns (and writes) its ResultRecord.

    With `resume`, an existing checkpoint in `run_dir` is continued exactly. `on_epoch(metrics,
    run_dir)` is called after each epoch's checkpoint is on disk (Ray Tune reports from there). `group`: this
    process's rank of a DDP worker group (bench.trial.distributed runs `run` on every rank); default, one process.
    """
    group = group or OneProcess()
    started = time.time()
    run_dir = Path(run_dir or cfg.out_dir)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, cfg.deterministic)
    parts = build_trial(cfg, device, group)
    bundle, model, readout, optimizer, regime, strategy = (
        parts.bundle, parts.model, parts.readout, parts.optimizer, parts.regime, parts.strategy)
    steps_per_epoch, total_steps = parts.steps_per_epoch, parts.total_steps

    from bench.flops import per_exit_cost
    from bench.readout import readout_macs

    cost = per_exit_cost(model, bundle.image_size, bundle.in_channels)
    readout_cost = readout_macs(readout)
    macs = [e.macs + r for e, r in zip(cost.exits, readout_cost)]
    # After the strategy: parameter groups it adds (a readout's weights) follow the schedule too.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(cfg.schedule, *regime.schedule_position(min(it, total_steps - 1)),
                                        steps_per_epoch))
    loader_generator = bundle.train.generator
    if cfg.init is not None and not (resume and (run_dir / CHECKPOINT).is_file()):
        from bench.backbones.checkpoint import init_from

        init_from(cfg.init.checkpoint, model, strategy, strict=cfg.init.strict)

    history: list[dict[str, Any]] = []
    start_epoch, train_time, train_images = 0, 0.0, 0
    ckpt_path = run_dir / CHECKPOINT
    if resume and ckpt_path.is_file():  # read and checked before anything in run_dir changes
        state = load_checkpoint(ckpt_path)
        check_resumable(state, ckpt_path)
        theirs = (state.get("config") or {}).get("method", {}).get("name")
        if theirs is not None and theirs != cfg.method["name"]:
            raise UsageError(f"checkpoint {str(ckpt_path)!r} was written by method {theirs!r}, not "
                             f"{cfg.method['name']!r}; resume it with method={theirs} or choose another out_dir=...")
        load_model_state(model, state["model"], ckpt_path)
        readout.load_state_dict(state.get("readout", {}))  # none in checkpoints from before readouts
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        strategy.load_state_dict(state["strategy"])
        _set_rng_state(state["rng"], loader_generator)
        start_epoch, history = state["epoch"], list(state["history"])
        train_time, train_images = state["train_time"], state["train_images"]
    group.wrap(strategy, model)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG, to_yaml(cfg))

    metrics_lines = [json.dumps(h) for h in history]
    K = model.num_exits
    for epoch in range(start_epoch, cfg.epochs):
        regime.begin_epoch(epoch, model, optimizer)
        group.begin_epoch(epoch)
        epoch_lr = optimizer.param_groups[0]["lr"]
        t0 = time.time()
        loss_sum, exit_loss_sum, exit_correct, seen = 0.0, torch.zeros(K), torch.zeros(K), 0
        batches = bundle.train
        if cfg.progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = strategy.step(x, y, epoch * steps_per_epoch + i)
            if not math.isfinite(out.loss) or not torch.isfinite(out.exit_losses).all():
                raise TrainingDiverged(f"loss is {out.loss} at epoch {epoch + 1}, iteration {i + 1} "
                                       f"(global step {epoch * steps_per_epoch + i + 1})")
            scheduler.step()
            loss_sum += out.loss * out.count
            exit_loss_sum += out.exit_losses * out.count
            exit_correct += out.exit_correct
            seen += out.count
        strategy.end_epoch(epoch, bundle.train)
        loss_sum, exit_loss_sum, exit_correct, seen = group.sum(loss_sum, exit_loss_sum, exit_correct, seen)
        epoch_time = time.time() - t0
        train_time += epoch_time
        train_images += seen
        val_acc = group.first(exit_accuracy, model, bundle.val, device, readout, progress=cfg.progress)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "phase": regime.phase(epoch),
            "lr": epoch_lr,
            "loss": loss_sum / seen,
            "time_s": epoch_time,
            "images_per_s": seen / epoch_time if epoch_time > 0 else 0.0,
            **{f"train_loss_{k + 1}": float(exit_loss_sum[k] / seen) for k in range(K)},
            **{f"train_acc_{k + 1}": 100.0 * float(exit_correct[k] / seen) for k in range(K)},
            **{f"val_acc_{k + 1}": val_acc[k] for k in range(K)},
            "val_acc_last": val_acc[-1],
        }
        history.append(row)
        metrics_lines.append(json.dumps(row))
        group.save(ckpt_path, {
            "epoch": epoch + 1, "model": model.state_dict(), "readout": readout.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "strategy": strategy.state_dict(),
            "rng": _rng_state(loader_generator), "history": history, "train_time": train_time,
            "train_images": train_images, "config": cfg.model_dump(mode="json"),
        })
        atomic_write_text(run_dir / METRICS, "\n".join(metrics_lines) + "\n")
        if on_epoch is not None:
            on_epoch(row, run_dir)

    report = group.first(evaluate_model, model, readout, bundle.calib, bundle.test, device, macs,
                         readout_macs=readout_cost, confidence=cfg.eval.confidence, logits_path=run_dir / LOGITS,
                         progress=cfg.progress)
    exits = [{**row, "params": cost.exits[row["exit"] - 1].params} for row in report["anytime"]]
    record = ResultRecord(
        trial_id=trial_id or run_dir.name, sweep=sweep, status="finished", config=cfg.model_dump(mode="json"),
        seed=cfg.seed, versions=package_versions(), git_commit=git_commit(), machine=machine(device),
        wall_time_s=time.time() - started, train_images_per_s=train_images / train_time if train_time else 0.0,
        counter=cost.counter, calibration=bundle.calibration,
        data_info={k: v for k, v in bundle.info.items() if k != "val_indices"}, epochs=history, exits=exits,
        budgets=report["budgets"], summary=report["summary"],
    )
    atomic_write_text(run_dir / RESULT, record.model_dump_json(indent=1))
    return record


