"""One trial on several workers: DDP under Ray Train's TorchTrainer (V2), inside a Ray Tune trial or from
`exitbench train` (`workers: {count: N, cpu: C, gpu: G}`; count 1 never comes here).

Every rank runs the whole trial, `bench.trial.train.run`, with a `bench.trial.workers.Workers` as its group
(what each rank shares and what rank 0 alone does is said there).

Ray: `fit_trial` (a sweep's Tune trial is the Train driver; each epoch's checkpoint goes to the trial folder
as `checkpoint_NNNNNN/`, so `--resume` works as for one-process trials) and `train` (`exitbench train`, a
local Ray). Workers get their own placement group (Train V2); the sweep sizes the Tune side so groups cannot
starve each other (bench.sweep.cluster; ray-project/ray#54305).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.config import TrialConfig, resolve_device
from bench.errors import UsageError
from bench.results import ResultRecord
from bench.runfolder import CHECKPOINT, METRICS, RESULT
from bench.trial.files import RESUME_DIR, copy_file, filesystem, read_text, restore_checkpoint, write_text
from bench.trial.train import TrainingDiverged, run
from bench.trial.workers import Workers

STAGING = "train"  # in a sweep's trial folder: Ray Train's storage; epochs/ holds rank 0's newest checkpoints
PLACEMENT_GROUP = "placement_group"  # in the staging folder: the worker group's placement group (its hex id)


def _scaling(cfg: TrialConfig):
    from ray.train import ScalingConfig

    w = cfg.workers
    return ScalingConfig(num_workers=w.count, use_gpu=w.gpu > 0,
                         resources_per_worker={"CPU": w.cpu, **({"GPU": w.gpu} if w.gpu > 0 else {})})


def _worker(config: dict[str, Any]) -> None:
    """Ray Train's function on every rank: the trial with this rank's Workers group. Rank 0's run outputs go
    back to the driver as the run's one Train checkpoint."""
    import ray.train
    import ray.train.torch

    from bench import registry
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

        placement = get_current_placement_group()
        if placement is not None:
            write_text(f"{staging}/{PLACEMENT_GROUP}", placement.id.hex())
    own = Path(tempfile.mkdtemp(prefix=f"exitbench-rank{rank}-"))  # each rank's own run folder ...
    run_dir = Path(config["run_dir"]) if rank == 0 and config["run_dir"] else own  # ... rank 0's may be given
    try:
        resume_from = config.get("resume_from")
        if resume_from and not (run_dir / CHECKPOINT).is_file():
            copy_file(resume_from, run_dir / CHECKPOINT)
        on_epoch = _StageEpochs(f"{staging}/epochs", cfg.epochs) if staging and rank == 0 else None
        group = Workers(cfg, resolve_device(cfg.device))
        record = run(cfg, run_dir, on_epoch=on_epoch, resume=bool(resume_from), trial_id=config.get("trial_id"),
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

        if row["epoch"] >= self.epochs:
            return
        fs, root = filesystem(f"{self.folder}/epoch_{row['epoch']:06d}")
        fs.create_dir(root)
        pafs.copy_files(str(run_dir / CHECKPOINT), f"{root}/{CHECKPOINT}", destination_filesystem=fs)
        pafs.copy_files(str(run_dir / METRICS), f"{root}/metrics.part", destination_filesystem=fs)
        fs.move(f"{root}/metrics.part", f"{root}/{METRICS}")  # whole or absent for the driver


def _raise_worker_error(err: Exception) -> None:
    """The first failed rank's own exception, as one process would have raised it (UsageError and
    TrainingDiverged keep their one-line handling)."""
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

    try:
        hex_id = (read_text(f"{staging}/{PLACEMENT_GROUP}") or "").strip()
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


    resumed = restore_checkpoint(trial_dir, scratch / CHECKPOINT)
    fs, root = filesystem(trial_dir)
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
                if fs.get_file_info(f"{folder}/{METRICS}").type != pafs.FileType.File:
                    continue  # rank 0 is writing it
                with fs.open_input_stream(f"{folder}/{METRICS}") as f:
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
    return ResultRecord.model_validate_json((scratch / RESULT).read_text())


def train(cfg: TrialConfig, run_dir: Path, *, resume: bool):
    """`exitbench train` with workers.count > 1: the worker group on a local Ray; rank 0 writes `run_dir` as
    one process would. Returns the ResultRecord."""
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer


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
        return ResultRecord.model_validate_json((run_dir / RESULT).read_text())
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started:
            ray.shutdown()
