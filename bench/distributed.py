"""One trial on several workers: DDP under Ray Train's TorchTrainer (V2), inside a Ray Tune trial or from
`exitbench train` (`workers: {count: N, cpu: C, gpu: G}`; count 1 never comes here).

Every rank runs the whole trial, `bench.train.run`, with a `Workers` as its group (the seam `run` offers;
its default `train.OneProcess` is the identity):

- data: the training loader rebuilt around a `DistributedSampler` (each rank 1/N of every epoch, reshuffled
  with `set_epoch`), batch_size / N per rank, so one step of N ranks sees the global batch; the held-out,
  calibration and test loaders are the full ones, and every evaluation runs on rank 0 over them (its numbers
  are the single-process numbers) and is broadcast;
- model: `DistributedDataParallel` (still the multi-exit contract: `ExitDDP`), handed to the strategy by
  `Strategy.distribute` with this group, whose collectives (`average`, `broadcast`, `gather`) a strategy's own
  networks and statistics go through (methods/base.py: `average_gradients`, `worker_mean`; L2W keeps its pseudo
  step per rank and averages its WPN's meta-gradient; Meta-GF trains copies and keeps the model outside DDP);
- metrics: the epoch's sums (losses x samples, correct counts, samples) all-reduced, never rank 0's alone;
- checkpoints: written by rank 0, read by every rank on resume; each rank's random streams are re-seeded from
  (seed, epoch, rank) at every epoch, so a resumed epoch draws what the uninterrupted one drew.

Ray: `fit_trial` (a sweep's Tune trial is the Train driver; each epoch's checkpoint goes to the trial folder
as `checkpoint_NNNNNN/`, so `--resume` works as for one-process trials) and `train` (`exitbench train`, a
local Ray). Workers get their own placement group (Train V2); `trial_resources` and `max_concurrent` size
the Tune side so groups cannot starve each other (ray-project/ray#54305).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from bench.config import TrialConfig
from bench.errors import UsageError

DRIVER_CPU = 0.1  # a distributed trial's Tune slot: it only starts the worker group and waits for it


# ----------------------------------------------------------------------------------------------------------
# One rank


class ExitDDP(DistributedDataParallel):
    """DDP that still offers the multi-exit contract: what the wrapper lacks (num_exits, head_module, ...)
    comes from the wrapped network."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class _Sharded:
    """A data bundle whose training loader is this rank's share; everything else is the bundle's own."""

    def __init__(self, bundle, train: DataLoader):
        self._bundle, self.train = bundle, train

    def __getattr__(self, name: str):
        return getattr(self._bundle, name)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}-{epoch}-{rank}".encode()).digest()[:8], "little") % 2**63


class Workers:
    """This process's rank of the trial's DDP group (torch.distributed initialised), as bench.train.run uses it
    (see train.OneProcess for the hooks)."""

    def __init__(self, cfg: TrialConfig, device: torch.device):
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.seed, self.sync_bn, self.regime = cfg.seed, cfg.workers.sync_bn, cfg.regime.name
        self.batch_size = cfg.batch_size // self.size
        self.device = torch.device(device)
        # nccl moves only CUDA tensors; gloo CPU ones
        self.comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.sampler: DistributedSampler | None = None
        self.generator = torch.Generator()

    def shard(self, bundle):
        full = bundle.train
        self.sampler = DistributedSampler(full.dataset, num_replicas=self.size, rank=self.rank, shuffle=True,
                                          seed=self.seed)
        train = DataLoader(full.dataset, batch_size=self.batch_size, sampler=self.sampler,
                           drop_last=len(self.sampler) > self.batch_size, generator=self.generator,
                           num_workers=full.num_workers, pin_memory=full.pin_memory,
                           persistent_workers=full.persistent_workers, worker_init_fn=full.worker_init_fn,
                           collate_fn=full.collate_fn)
        return _Sharded(bundle, train)

    def wrap(self, strategy, model: torch.nn.Module) -> None:
        if self.sync_bn:  # in place: the optimiser's parameters and the buffers are the same tensors
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
        # Parameters without a gradient in some step (a regime's frozen parts and phase 1's unused heads, exits
        # of weight 0): DDP must be told to look for them, which costs a graph walk per step otherwise saved.
        unused = self.regime != "joint" or strategy.leaves_parameters_unused()
        strategy.distribute(ExitDDP(model, device_ids=ids, find_unused_parameters=unused), self)

    def begin_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        seed = epoch_seed(self.seed, epoch, self.rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.generator.manual_seed(seed)

    def sum(self, *values):
        flat = torch.cat([torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in values]).to(self.comm)
        dist.all_reduce(flat)
        flat, out, start = flat.cpu(), [], 0
        for v in values:
            if isinstance(v, torch.Tensor):
                out.append(flat[start:start + v.numel()].to(v.dtype).reshape(v.shape))
                start += v.numel()
            else:
                out.append(type(v)(flat[start].item()))
                start += 1
        return tuple(out)

    def first(self, fn, *args, **kwargs):
        box = [fn(*args, **kwargs) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.comm)
        return box[0]

    def save(self, path: Path, state: dict[str, Any]) -> None:
        if self.rank == 0:
            from bench.train import save_checkpoint

            save_checkpoint(path, state)

    # collectives for strategies with networks of their own (Strategy.distribute)
    def average(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ranks' mean of each tensor (one all-reduce)."""
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(self.comm)
        dist.all_reduce(flat)
        flat = flat.to(tensors[0].device) / self.size
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].view_as(t))
            start += t.numel()
        return out

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        for t in module.state_dict().values():
            buffer = t.detach().to(self.comm)
            dist.broadcast(buffer, src=0)
            t.detach().copy_(buffer)


# ----------------------------------------------------------------------------------------------------------
# Ray Train


def _scaling(cfg: TrialConfig):
    from ray.train import ScalingConfig

    w = cfg.workers
    return ScalingConfig(num_workers=w.count, use_gpu=w.gpu > 0,
                         resources_per_worker={"CPU": w.cpu, **({"GPU": w.gpu} if w.gpu > 0 else {})})


def _copy(source: str, dest: Path) -> None:
    """A file given as a local path or a URI, copied to a local path."""
    from bench.tune import _fs

    fs, path = _fs(source)
    with fs.open_input_stream(path) as src:
        dest.write_bytes(src.readall())


STAGING = "train"  # in a sweep's trial folder: Ray Train's storage; epochs/ holds rank 0's newest checkpoints
PLACEMENT_GROUP = "placement_group"  # in the staging folder: the worker group's placement group (its hex id)


def _worker(config: dict[str, Any]) -> None:
    """Ray Train's function on every rank: the trial with this rank's Workers group. Rank 0's run outputs go
    back to the driver as the run's one Train checkpoint."""
    import ray.train
    import ray.train.torch

    from bench import registry, train
    from bench.config import validate_trial

    registry.include(list(config["includes"]))
    rank = ray.train.get_context().get_world_rank()
    cfg = validate_trial(config["trial"])
    # one thread per CPU of the worker (recorded), no progress bars inside Ray workers
    cfg = cfg.model_copy(update={"progress": False, "threads": cfg.threads or max(1, int(cfg.workers.cpu))})
    if cfg.workers.gpu > 0 and torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())
    staging = config.get("staging")
    if staging and rank == 0:  # for the driver, which frees the workers at once if Tune stops the trial
        from ray.util import get_current_placement_group

        from bench.tune import _write_text

        placement = get_current_placement_group()
        if placement is not None:
            _write_text(f"{staging}/{PLACEMENT_GROUP}", placement.id.hex())
    own = Path(tempfile.mkdtemp(prefix=f"exitbench-rank{rank}-"))  # each rank's own run folder ...
    run_dir = Path(config["run_dir"]) if rank == 0 and config["run_dir"] else own  # ... rank 0's may be given
    try:
        resume_from = config.get("resume_from")
        if resume_from and not (run_dir / train.CHECKPOINT).is_file():
            _copy(resume_from, run_dir / train.CHECKPOINT)
        on_epoch = _StageEpochs(f"{staging}/epochs", cfg.epochs) if staging and rank == 0 else None
        group = Workers(cfg, train.resolve_device(cfg.device))
        record = train.run(cfg, run_dir, on_epoch=on_epoch, resume=bool(resume_from), trial_id=config.get("trial_id"),
                           sweep=config.get("sweep"), group=group)
        final = {**record.epochs[-1], "test_top1_last": record.exits[-1]["top1"]}
        if rank == 0:
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(run_dir)))
        else:
            ray.train.report(final)
    finally:
        shutil.rmtree(own, ignore_errors=True)


class _StageEpochs:
    """A sweep's rank 0 after each epoch but the last (reported after the evaluation, with the outputs): the
    engine's checkpoint and metrics to `<staging>/epoch_NNNNNN/`, metrics last (the driver reads a folder once
    its metrics are there). The driver hands each one to Tune and removes it; the workers never wait for it."""

    def __init__(self, folder: str, epochs: int):
        self.folder, self.epochs = folder, epochs

    def __call__(self, row: dict[str, Any], run_dir: Path) -> None:
        import pyarrow.fs as pafs

        from bench.tune import _fs

        if row["epoch"] >= self.epochs:
            return
        fs, root = _fs(f"{self.folder}/epoch_{row['epoch']:06d}")
        fs.create_dir(root)
        pafs.copy_files(str(run_dir / "checkpoint.pt"), f"{root}/checkpoint.pt", destination_filesystem=fs)
        pafs.copy_files(str(run_dir / "metrics.jsonl"), f"{root}/metrics.part", destination_filesystem=fs)
        fs.move(f"{root}/metrics.part", f"{root}/metrics.jsonl")  # whole or absent for the driver


def _raise_worker_error(err: Exception) -> None:
    """The first failed rank's own exception, as one process would have raised it (UsageError and
    TrainingDiverged keep their one-line handling)."""
    from bench.train import TrainingDiverged

    failures = getattr(err, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        for kind in (TrainingDiverged, UsageError):
            if isinstance(failure, kind):
                raise kind(_last_line(failure)) from None
        raise RuntimeError(f"worker {rank} failed: {_last_line(failure)}") from err
    raise err


def _last_line(err: BaseException) -> str:
    """The message of a worker's exception (Ray's text puts the traceback first, 'Type: message' last)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1] in ("UsageError", "ConfigError", "TrainingDiverged") else last


def _free_workers(staging: str) -> None:
    """Remove the worker group's placement group: its actors end now, and its CPUs/GPUs are free for the next
    trial (ray#54305: a stopped trial's group otherwise outlives it)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    from bench.tune import _read_text

    try:
        hex_id = (_read_text(f"{staging}/{PLACEMENT_GROUP}") or "").strip()
        if hex_id:
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(hex_id)))
    except Exception:  # already gone with its run
        pass


def fit_trial(cfg: TrialConfig, *, raw: dict[str, Any], trial_dir: str, scratch: Path, trial_id: str, sweep: str,
              includes: tuple[str, ...]):
    """A sweep's Tune trial as the Train driver: continue from the trial folder's newest checkpoint, run the
    worker group in a thread, hand each epoch rank 0 stages to Tune (`tune.report` with its checkpoint, from
    this thread, so Tune's retention, ASHA and `--resume` see it as a one-process trial's), and leave the run's
    outputs (result.json, logits.pt, checkpoint.pt, metrics.jsonl) in `scratch`; returns the ResultRecord.
    Tune stopping the trial (SystemExit from tune.report) or any error frees the workers at once."""
    import threading

    import pyarrow.fs as pafs
    from ray import tune
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from bench.results import ResultRecord
    from bench.train import CHECKPOINT
    from bench.tune import RESUME_DIR, _fs, restore_checkpoint

    resumed = restore_checkpoint(trial_dir, scratch / CHECKPOINT)
    fs, root = _fs(trial_dir)
    staging = f"{trial_dir}/{STAGING}"
    fs.delete_dir_contents(f"{root}/{STAGING}", missing_dir_ok=True)  # an earlier attempt's: never continued
    fs.create_dir(f"{root}/{STAGING}")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"trial": raw, "run_dir": None, "staging": staging, "sweep": sweep, "trial_id": trial_id,
                           "includes": list(includes),
                           "resume_from": f"{trial_dir}/{RESUME_DIR}/{CHECKPOINT}" if resumed else None},
        scaling_config=_scaling(cfg),
        run_config=RunConfig(name=STAGING, storage_path=trial_dir),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: B036 - handed to the trial's thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="exitbench-train-driver", daemon=True)
    thread.start()
    epochs = f"{root}/{STAGING}/epochs"
    try:
        while True:
            running = thread.is_alive()
            found = fs.get_file_info(pafs.FileSelector(epochs, allow_not_found=True))
            for folder in sorted(f.path for f in found if f.type == pafs.FileType.Directory):
                if fs.get_file_info(f"{folder}/metrics.jsonl").type != pafs.FileType.File:
                    continue  # rank 0 is writing it
                with fs.open_input_stream(f"{folder}/metrics.jsonl") as f:
                    row = [line for line in f.readall().decode().splitlines() if line.strip()][-1]
                checkpoint = (tune.Checkpoint.from_directory(folder) if isinstance(fs, pafs.LocalFileSystem)
                              else tune.Checkpoint(path=folder, filesystem=fs))
                tune.report(json.loads(row), checkpoint=checkpoint)  # persisted before it returns
                fs.delete_dir(folder)
            if not running:
                break
            thread.join(timeout=0.5)
    except BaseException:
        _free_workers(staging)
        thread.join(timeout=60)
        raise
    if "error" in outcome:
        _raise_worker_error(outcome["error"])
    outcome["result"].checkpoint.to_directory(str(scratch))
    fs.delete_dir_contents(f"{root}/{STAGING}", missing_dir_ok=True)
    return ResultRecord.model_validate_json((scratch / "result.json").read_text())


def train(cfg: TrialConfig, run_dir: Path, *, resume: bool):
    """`exitbench train` with workers.count > 1: the worker group on a local Ray; rank 0 writes `run_dir` as
    one process would. Returns the ResultRecord."""
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from bench.results import ResultRecord
    from bench.train import CHECKPOINT

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    w = cfg.workers
    if w.count * w.cpu > cpus or w.count * w.gpu > gpus:
        raise UsageError(f"workers: {w.count} x (cpu={w.cpu:g}, gpu={w.gpu:g}) is more than this machine has "
                         f"({cpus} CPUs, {gpus} GPUs); lower workers.count, workers.cpu or workers.gpu")
    run_dir = run_dir.resolve()
    started = not ray.is_initialized()
    if started:
        # the workers' logs stay in Ray's log folder; rank 0 appends each epoch to run_dir/metrics.jsonl
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 num_cpus=cpus, num_gpus=gpus)
    storage = tempfile.mkdtemp(prefix="exitbench-train-")
    try:
        from bench.registry import included

        trainer = TorchTrainer(
            _worker,
            train_loop_config={"trial": cfg.model_dump(), "run_dir": str(run_dir), "includes": list(included()),
                               "resume_from": str(run_dir / CHECKPOINT) if resume else None},
            scaling_config=_scaling(cfg),
            run_config=RunConfig(name="train", storage_path=storage),
        )
        try:
            trainer.fit()
        except Exception as err:
            _raise_worker_error(err)
        return ResultRecord.model_validate_json((run_dir / "result.json").read_text())
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------------------
# Tune's side


def is_distributed(trial: dict[str, Any]) -> bool:
    return int((trial.get("workers") or {}).get("count", 1)) > 1


def footprint(trial: dict[str, Any], cpu: float, gpu: float) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds while it runs: its Tune slot, plus its worker group when distributed."""
    if not is_distributed(trial):
        return cpu, gpu
    w = trial["workers"]
    return DRIVER_CPU + w["count"] * w["cpu"], w["count"] * w["gpu"]


def trial_resources(cpu: float, gpu: float):
    """Tune's resources per trial: the sweep's `resources` for a one-process trial; for a distributed one a
    small driver slot (its workers hold their own placement group)."""

    from ray.tune import PlacementGroupFactory

    def resources(config: dict[str, Any]) -> PlacementGroupFactory:
        if is_distributed(config["point"]["trial"]):
            return PlacementGroupFactory([{"CPU": DRIVER_CPU}])
        return PlacementGroupFactory([{"CPU": cpu, **({"GPU": gpu} if gpu else {})}])

    return resources


def max_concurrent(trials: list[dict[str, Any]], cpu: float, gpu: float, nodes, given: int | None) -> int | None:
    """With distributed trials, at most as many trials at once as the cluster holds whole (the largest
    footprint counted): a trial whose driver runs while its workers cannot be placed would hold resources
    another trial's workers wait for (ray#54305). `given` (max_concurrent) only lowers it; `nodes()` gives
    the cluster's nodes' resources."""
    if not any(is_distributed(t) for t in trials):
        return given
    nodes = nodes()  # the Ray cluster's nodes' resources, asked only now
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    need = [footprint(t, cpu, gpu) for t in trials]
    limit = int(total_cpu // max(c for c, _ in need) + 1e-9) if max(c for c, _ in need) > 0 else len(trials)
    if max(g for _, g in need) > 0:
        limit = min(limit, int(total_gpu // max(g for _, g in need) + 1e-9))
    limit = max(1, limit)
    return min(limit, given) if given else limit


def check_fits(trials: list[dict[str, Any]], nodes: list[dict[str, float]], where: str) -> None:
    """Each distributed trial's worker: on some node; its whole group plus driver: in the cluster."""
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    for t in trials:
        if not is_distributed(t):
            continue
        w = t["workers"]
        if not any(n.get("CPU", 0) >= w["cpu"] and n.get("GPU", 0) >= w["gpu"] for n in nodes):
            raise UsageError(f"workers.cpu={w['cpu']:g}, workers.gpu={w['gpu']:g}: no node of {where} has that "
                             f"much for one worker; lower workers.cpu / workers.gpu")
        cpu, gpu = footprint(t, 0, 0)
        if cpu > total_cpu + 1e-9 or gpu > total_gpu + 1e-9:
            raise UsageError(f"workers: {w['count']} x (cpu={w['cpu']:g}, gpu={w['gpu']:g}) plus the trial's driver "
                             f"({DRIVER_CPU:g} CPU) is more than {where} has ({total_cpu:g} CPUs, {total_gpu:g} "
                             f"GPUs); lower workers.count, workers.cpu or workers.gpu")
