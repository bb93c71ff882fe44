"""The sweep's one function trainable: a job (a trial dict with its key) becomes `bench.trial.train.run` in a
scratch run folder (or a DDP worker group's driver), each epoch reported to Tune with its checkpoint, the
record written to the store, the run's outputs synced to the trial folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune

from bench.config import SweepConfig
from bench.errors import describe
from bench.runfolder import CHECKPOINT, CONFIG, LOGITS, METRICS, RESULT
from bench.sweep import cluster
from bench.sweep.grid import trial_dict, trial_dirname
from bench.sweep.store import Store, failed_record
from bench.trial.files import restore_checkpoint

RUN_FOLDER = "run"  # inside each Ray trial folder: the engine's outputs of a finished trial
RUN_OUTPUTS = (CONFIG, METRICS, LOGITS, RESULT)


def report_epoch(metrics: dict[str, Any], run_dir: Path) -> None:
    """tune.report with a checkpoint folder holding the engine's checkpoint and metrics (Tune copies it)."""
    folder = run_dir / "tune-report"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name in (CHECKPOINT, METRICS):
        try:
            os.link(run_dir / name, folder / name)  # the engine replaces (never rewrites) them: a link is a snapshot
        except OSError:
            shutil.copy2(run_dir / name, folder / name)
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))  # persisted before it returns
    shutil.rmtree(folder, ignore_errors=True)


def run_trial(config: dict[str, Any], *, sweep_dir: str, sweep_name: str, cpus: float, cwd: str,
              includes: tuple[str, ...] = ()) -> None:
    """Tune function trainable: train one job, report each epoch with its checkpoint, store the record.

    The job's key (not Tune's trial id, which a rebuilt run does not keep) names the trial in the store, and
    its trial folder holds the checkpoints it continues from."""
    import torch

    from bench import registry
    from bench.trial import train

    registry.include(list(includes))  # the driver's --include plugins, in this worker too

    started = time.time()
    torch.set_num_threads(max(1, int(cpus)))
    torch.use_deterministic_algorithms(False)  # a reused actor must not inherit the last trial's mode
    workdir = Path.cwd()  # Ray's trial working directory: synced to the trial folder when the trial ends
    if Path(cwd).is_dir():
        os.chdir(cwd)  # relative paths (data.root) mean what they mean to `exitbench train` in that folder
    store = Store(sweep_dir)
    job = config["point"]
    trial_id = job["key"]
    raw = trial_dict(config)
    if store.status(trial_id) in ("finished", "stopped"):
        return  # stored before the driver died: never rerun
    # The engine's run folder, local to the worker; one name per trial, so a resumed trial first clears what a
    # killed attempt left behind.
    sweep_hash = hashlib.sha1(sweep_dir.encode()).hexdigest()[:8]
    scratch = Path(tempfile.gettempdir()) / "exitbench" / f"{sweep_hash}-{trial_id}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        try:
            from bench.config import validate_trial

            cfg = validate_trial(raw)
            if cfg.workers.count > 1:  # this trial drives a DDP worker group (Ray Train); outputs land in scratch
                from bench.trial import distributed

                record = distributed.fit_trial(cfg, raw=raw, trial_dir=f"{sweep_dir}/{trial_dirname(job)}",
                                               scratch=scratch, trial_id=trial_id, sweep=sweep_name,
                                               includes=includes)
            else:
                # resuming: the engine continues exactly from its own checkpoint
                restore_checkpoint(f"{sweep_dir}/{trial_dirname(job)}", scratch / CHECKPOINT)

                def on_epoch(row: dict[str, Any], run_dir: Path) -> None:
                    if row["epoch"] >= cfg.epochs:
                        return  # the last epoch is reported after evaluation, so a scheduler stop cannot cut it off
                    report_epoch(dict(row), run_dir)

                record = train.run(cfg, scratch, on_epoch=on_epoch, resume=True, trial_id=trial_id,
                                   sweep=sweep_name)
        except Exception as err:
            store.write(failed_record(trial_id, sweep_name, raw, describe(err), time.time() - started,
                                       job.get("retried_with")))
            raise
        if job.get("retried_with"):
            record.summary["retried_with"] = " ".join(job["retried_with"])
        store.write(record)
        out = workdir / RUN_FOLDER
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_OUTPUTS:
            if (scratch / name).is_file():
                shutil.copy2(scratch / name, out / name)
        report_epoch({**record.epochs[-1], "test_top1_last": record.exits[-1]["top1"]}, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def trainable(sweep: SweepConfig, sweep_dir: str):
    """`run_trial` bound to this sweep, with Tune's resources per trial."""
    from bench.registry import included

    trainable = tune.with_parameters(run_trial, sweep_dir=sweep_dir, sweep_name=sweep.name,
                                     cpus=sweep.resources.cpu, cwd=os.getcwd(), includes=tuple(included()))
    if not any(cluster.is_distributed(t.model_dump()) for t in sweep.trials()):
        return tune.with_resources(trainable, {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu})
    # a distributed trial's Tune slot is its driver only; its workers hold a placement group of their own
    return tune.with_resources(trainable, cluster.trial_resources(sweep.resources.cpu, sweep.resources.gpu))
