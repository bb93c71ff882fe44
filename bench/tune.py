"""Sweeps on Ray Tune: a SweepConfig becomes a `tune.Tuner` over one function trainable that calls
`bench.train.run`. Tune does the orchestration (scheduling, resources, many nodes); the engine does the work.

A sweep folder `<storage_path>/<name>/` holds:

    sweep.yaml            the validated SweepConfig (`--resume` reads it back)
    jobs.json             the expanded sweep: every trial's key, label and full config (search values drawn)
    driver.lock           the running driver's pid, host and the Ray processes it started
    store/                the results store (bench.results): runs, exits, budgets, epochs, records
    <key>_<label>/        the trial folder: checkpoint_NNNNNN/ (the engine's checkpoint after each epoch, the
                          newest `keep_checkpoints`), checkpoint_resume/ (the one a resumed attempt continued
                          from), run/ (config.yaml, metrics.jsonl, logits.pt, result.json of a finished trial)
    experiment_state-*.json, tuner.pkl, ...   Ray's experiment state: written by Tune, never read back

Resume is built from exitbench's own state only (jobs.json, the store, the trial folders): `--resume` runs a
new Tuner over the jobs without a finished or stopped record, and each continues from the newest checkpoint
in its folder that loads. A kill at any moment (Tune's state half-written included) loses at most the epochs
since the last checkpoint, and no pickle from the sweep folder is ever loaded.

Failures: a trial that raises (or diverges) writes a failed record, then re-raises so Tune marks it ERROR;
`--resume` continues failed trials from their last checkpoint (a passing fault heals, a divergence recurs and
is recorded again), or with trial-field overrides starts them again from epoch 0 with the new settings, and
never runs a finished trial again. A driver-side callback records what a trial cannot: trials stopped early
by ASHA and trials whose worker died.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from bench import results
from bench.config import SweepConfig, _set_path, load_sweep, read_yaml, resolve_config, validate_sweep
from bench.errors import UsageError, check_output_dir
from bench.results import ResultRecord

DEFAULT_SWEEP = Path(__file__).resolve().parent / "configs" / "default.yaml"
SWEEP_FILE = "sweep.yaml"
RUN_FOLDER = "run"  # inside each Ray trial folder: the engine's outputs of a finished trial
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "logits.pt", "result.json")
EPOCH_METRICS = re.compile(r"^(loss|lr|time_s|images_per_s|val_acc_last|(val_acc|train_acc|train_loss)_\d+)$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")  # Tune's names for a trial's persisted checkpoints
RESUME_DIR = "checkpoint_resume"  # in a trial folder: the checkpoint its current attempt continued from
JOBS_FILE = "jobs.json"  # the expanded sweep: every trial's key, label and full config
LOCK_FILE = "driver.lock"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str) -> bool:
    return bool(_URI.match(location))


# ----------------------------------------------------------------------------------------------------------
# Results store on a local/shared path or an object-store URI


class Store:
    """The results store of one sweep folder, given as a path or a URI (pyarrow filesystem)."""

    def __init__(self, sweep_dir: str):
        import pyarrow.fs as pafs

        self.location = sweep_dir
        if is_uri(sweep_dir):
            self.fs, self.root = pafs.FileSystem.from_uri(sweep_dir)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), sweep_dir
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def write(self, record: ResultRecord) -> None:
        if self.local:
            results.write(record, self.root)  # atomic per file
            return
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory(prefix="exitbench-store-") as tmp:
            results.write(record, tmp)  # each object is uploaded whole: no half files in object stores either
            pafs.copy_files(f"{tmp}/store", f"{self.root}/store", destination_filesystem=self.fs)

    def read(self, trial_id: str) -> dict[str, Any] | None:
        import pyarrow.fs as pafs

        path = f"{self.root}/store/records/{trial_id}.json"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.readall())

    def status(self, trial_id: str) -> str | None:
        record = self.read(trial_id)
        return None if record is None else record["status"]


def _write_text(location: str, text: str) -> None:
    if is_uri(location):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(location)
        fs.create_dir(path.rsplit("/", 1)[0])
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
    else:
        results.atomic_write_text(Path(location), text)


def _read_text(location: str) -> str | None:
    if is_uri(location):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(location)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.readall().decode()
    path = Path(location)
    return path.read_text() if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------
# The trial: one grid point (plus sampled search values) -> bench.train.run


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value, separators=(",", ":")).strip('"')


def grid_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every grid point x seed as a validated, fully defaulted trial dict with a label that names the point:
    method-dataset-backbone, then each varied axis (`lr=0.1`; a section given whole is named by its position
    on the axis, `method=2`), then the seed."""
    combos = [dict(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())]
    points = []
    for index, cfg in enumerate(sweep.trials()):
        combo = combos[index // len(sweep.seeds)]
        raw = cfg.model_dump()  # python mode: JSON mode would turn inf (e.g. data.noise) into null
        raw["progress"] = False  # no tqdm bars inside Ray workers
        # The thread count is part of the result (float sums round per thread split): fixed and recorded, so
        # `exitbench train` of a trial's config.yaml gives its numbers again.
        cpus = raw["workers"]["cpu"] if raw["workers"]["count"] > 1 else sweep.resources.cpu  # per process
        raw["threads"] = raw["threads"] or max(1, int(cpus))
        varied = [f"{path.rsplit('.', 1)[-1]}="
                  + (str(sweep.grid[path].index(value)) if isinstance(value, dict) else _short(value))
                  for path, value in combo.items() if len(sweep.grid[path]) > 1]
        label = "-".join([raw["method"]["name"], raw["data"]["name"], raw["backbone"]["name"], *varied,
                          f"s{raw['seed']}"])
        points.append({"index": index, "label": label, "trial": raw})
    return points


def _sample(dist: dict[str, list[Any]], rng: random.Random) -> Any:
    kind, args = next(iter(dist.items()))
    if kind == "choice":
        return copy.deepcopy(rng.choice(args))
    if kind == "randint":
        return rng.randrange(args[0], args[1])
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
    return rng.uniform(args[0], args[1])


def expand(sweep: SweepConfig, uid: str) -> list[dict[str, Any]]:
    """The sweep's jobs: every grid point x seed x search sample, with its search values drawn here (a seeded
    stream, so the jobs are a pure function of the sweep) and a key `<uid>_<NNNNN>` that names its trial in the
    store and its trial folder for good, whichever driver runs it."""
    rng = random.Random(0)
    jobs = []
    for point in grid_points(sweep):
        for _ in range(sweep.search.num_samples):
            raw = copy.deepcopy(point["trial"])
            label = point["label"]
            for path, dist in sweep.search.space.items():
                value = _sample(dist, rng)
                _set_path(raw, path, value)
                label = label.rsplit("-s", 1)[0] + f"-{path.rsplit('.', 1)[-1]}={_short(value)}-s{raw['seed']}"
            jobs.append({"key": f"{uid}_{len(jobs):05d}", "label": label, "trial": raw})
    return jobs


def trial_dict(tune_config: dict[str, Any]) -> dict[str, Any]:
    """The trial dict of a Tune config (its job's)."""
    return copy.deepcopy(tune_config["point"]["trial"])


def trial_dirname(job: dict[str, Any]) -> str:
    label = re.sub(r"[^A-Za-z0-9._=,-]+", "-", job.get("label", "trial"))
    return f"{job['key']}_{label}"[:100]


def _failed_record(trial_id: str, sweep_name: str, raw: dict[str, Any], error: str, wall_time: float = 0.0,
                   retried_with: list[str] | None = None):
    from bench.train import git_commit, package_versions

    return ResultRecord(trial_id=trial_id, sweep=sweep_name, status="failed", error=error, config=raw,
                        seed=int(raw.get("seed", 0)), versions=package_versions(), git_commit=git_commit(),
                        wall_time_s=wall_time,
                        summary={"retried_with": " ".join(retried_with)} if retried_with else {})


def _describe(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _report(metrics: dict[str, Any], run_dir: Path) -> None:
    """tune.report with a checkpoint folder holding the engine's checkpoint and metrics (Tune copies it)."""
    folder = run_dir / "tune-report"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl"):
        try:
            os.link(run_dir / name, folder / name)  # the engine replaces (never rewrites) them: a link is a snapshot
        except OSError:
            shutil.copy2(run_dir / name, folder / name)
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))  # persisted before it returns
    shutil.rmtree(folder, ignore_errors=True)


def _fs(location: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(location) if is_uri(location) else (pafs.LocalFileSystem(), location)


def _epochs_in(fs, folder: str) -> int:
    """Epochs a checkpoint folder claims (lines of its metrics.jsonl): the order in which to try them."""
    try:
        with fs.open_input_stream(f"{folder}/metrics.jsonl") as f:
            return sum(1 for line in f.readall().decode().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        return -1


def restore_checkpoint(trial_dir: str, dest: Path) -> bool:
    """Continue a trial from its own folder: copy the newest of its checkpoints that loads to `dest` (the
    engine's run folder) and keep it as `checkpoint_resume/`, then drop the numbered ones of the previous
    attempt (Tune numbers each attempt's checkpoints from 0 again, and the retention limit counts only its own).
    Returns False if the trial has no readable checkpoint (it starts from epoch 0).

    Nothing here depends on Ray Tune's experiment state: a crash that truncated it, or a retention limit that
    deleted the checkpoint it names, leaves this path intact. A copy cut short by a crash does not load and
    the next older one is taken.
    """
    import pyarrow.fs as pafs

    from bench.backbones.checkpoint import torch_load
    from bench.train import CHECKPOINT

    fs, root = _fs(trial_dir)
    found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    numbered = [f.path for f in found if f.type == pafs.FileType.Directory and CHECKPOINT_DIR.fullmatch(f.base_name)]
    kept = [f.path for f in found if f.type == pafs.FileType.Directory and f.base_name.startswith(RESUME_DIR)]
    for folder in sorted(numbered + kept, key=lambda f: _epochs_in(fs, f), reverse=True):
        try:
            with fs.open_input_stream(f"{folder}/{CHECKPOINT}") as src:
                dest.write_bytes(src.readall())
            torch_load(dest)  # a copy cut short by a crash does not load
        except Exception:  # missing or truncated: try the next older one
            dest.unlink(missing_ok=True)
            continue
        resume = f"{root}/{RESUME_DIR}"
        if folder != resume:  # keep the one resumed from under a fixed name, written before the others go
            staging = f"{resume}.tmp"
            if folder != staging:
                fs.delete_dir_contents(staging, missing_dir_ok=True)
                fs.create_dir(staging)
                for name in (CHECKPOINT, "metrics.jsonl"):
                    if fs.get_file_info(f"{folder}/{name}").type == pafs.FileType.File:
                        fs.copy_file(f"{folder}/{name}", f"{staging}/{name}")
            if fs.get_file_info(resume).type == pafs.FileType.Directory:
                fs.delete_dir(resume)
            try:
                fs.move(staging, resume)
            except (OSError, NotImplementedError):  # object stores rename no folders: copy, then drop
                pafs.copy_files(staging, resume, source_filesystem=fs, destination_filesystem=fs)
                fs.delete_dir(staging)
        for old in numbered:
            fs.delete_dir(old)
        return True
    return False


def run_trial(config: dict[str, Any], *, sweep_dir: str, sweep_name: str, cpus: float, cwd: str,
              includes: tuple[str, ...] = ()) -> None:
    """Tune function trainable: train one job, report each epoch with its checkpoint, store the record.

    The job's key (not Tune's trial id, which a rebuilt run does not keep) names the trial in the store, and
    its trial folder holds the checkpoints it continues from."""
    import torch

    from bench import registry, train

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
                from bench import distributed

                record = distributed.fit_trial(cfg, raw=raw, trial_dir=f"{sweep_dir}/{trial_dirname(job)}",
                                               scratch=scratch, trial_id=trial_id, sweep=sweep_name,
                                               includes=includes)
            else:
                # resuming: the engine continues exactly from its own checkpoint
                restore_checkpoint(f"{sweep_dir}/{trial_dirname(job)}", scratch / train.CHECKPOINT)

                def on_epoch(row: dict[str, Any], run_dir: Path) -> None:
                    if row["epoch"] >= cfg.epochs:
                        return  # the last epoch is reported after evaluation, so a scheduler stop cannot cut it off
                    _report(dict(row), run_dir)

                record = train.run(cfg, scratch, on_epoch=on_epoch, resume=True, trial_id=trial_id,
                                   sweep=sweep_name)
        except Exception as err:
            store.write(_failed_record(trial_id, sweep_name, raw, _describe(err), time.time() - started,
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
        _report({**record.epochs[-1], "test_top1_last": record.exits[-1]["top1"]}, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Driver side


def _trial_name(trial) -> str:
    return trial.config["point"]["key"]


def _trial_dirname(trial) -> str:
    return trial_dirname(trial.config["point"])


def _last_line(text: str | None) -> str | None:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:500] if lines else None


class StoreCallback(tune.Callback):
    """Driver side: records the trials a trainable cannot record itself, those stopped early by the
    scheduler (ASHA) and those whose worker process died."""

    def __init__(self, sweep_dir: str, sweep_name: str):
        self.sweep_dir, self.sweep_name = sweep_dir, sweep_name

    def on_trial_complete(self, iteration, trials, trial, **info):
        store = Store(self.sweep_dir)
        key = trial.config["point"]["key"]
        if store.status(key) == "finished":
            return  # the trainable stored its own record
        from bench.train import git_commit, package_versions

        raw = trial_dict(trial.config)
        epochs = _epochs_of(trial)
        seconds = sum(e.get("time_s", 0.0) for e in epochs)
        images = sum(e.get("time_s", 0.0) * e.get("images_per_s", 0.0) for e in epochs)
        store.write(ResultRecord(
            trial_id=key, sweep=self.sweep_name, status="stopped", config=raw,
            seed=int(raw.get("seed", 0)), versions=package_versions(), git_commit=git_commit(),
            wall_time_s=float(trial.last_result.get("time_total_s", 0.0)),
            train_images_per_s=images / seconds if seconds else 0.0, epochs=epochs,
            summary={"epochs_trained": len(epochs)}))

    def on_trial_error(self, iteration, trials, trial, **info):
        store = Store(self.sweep_dir)
        key = trial.config["point"]["key"]
        if store.status(key) == "failed":
            return  # the trainable stored its own record, with its exception
        error = _last_line(trial.get_error()) or "the trial's worker failed (see Ray's error file)"
        store.write(_failed_record(key, self.sweep_name, trial_dict(trial.config), error))


def _epochs_of(trial) -> list[dict[str, Any]]:
    """Per-epoch metrics of a stopped trial, from its latest persisted checkpoint (it carries metrics.jsonl)."""
    checkpoint = trial.checkpoint
    if checkpoint is None:
        return []
    path = f"{checkpoint.path}/metrics.jsonl"
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            text = f.readall().decode()
    except (OSError, FileNotFoundError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def varied_columns(sweep: SweepConfig) -> dict[str, str]:
    """The live table's parameter columns: what the grid varies (a component axis shows its name and the
    options its values spell out), the seed, and the searched fields; never a component's untouched defaults."""
    columns: dict[str, str] = {}
    for path, values in sweep.grid.items():
        keys = [path]
        if all(isinstance(v, (dict, str)) for v in values) and path.split(".")[-1] in ("data", "backbone", "method"):
            given = [v if isinstance(v, dict) else {"name": v} for v in values]
            keys = [f"{path}.{k}" for k in dict.fromkeys(k for v in given for k in v)
                    if len({json.dumps(v.get(k), sort_keys=True) for v in given}) > 1]
        for key in keys:
            columns["point/trial/" + key.replace(".", "/")] = key
    if len(sweep.seeds) > 1 or not columns:
        columns["point/trial/seed"] = "seed"
    for path in sweep.search.space:  # drawn into each job's trial dict (see expand)
        columns["point/trial/" + path.replace(".", "/")] = path
    return columns


def _reporter(sweep: SweepConfig):
    return tune.CLIReporter(parameter_columns=varied_columns(sweep),
                            metric_columns={"epoch": "epoch", "val_acc_last": "val_acc_last"},
                            max_report_frequency=30, max_progress_rows=40, max_error_rows=10, max_column_length=30)


# Opt-in experiment trackers, through Ray Tune's own logger callbacks: field -> (package, module, class, the
# option that names the run group, set to the sweep's name unless given)
LOGGERS = {"wandb": ("wandb", "ray.air.integrations.wandb", "WandbLoggerCallback", "project"),
           "mlflow": ("mlflow", "ray.air.integrations.mlflow", "MLflowLoggerCallback", "experiment_name")}


def logger_callbacks(sweep: SweepConfig) -> list:
    """Ray Tune's W&B / MLflow callbacks for the trackers a sweep opts into (`loggers: {wandb: {...}}`)."""
    import importlib
    import importlib.util

    callbacks = []
    for name, options in sweep.loggers.items():
        package, module, class_name, group = LOGGERS[name]
        if importlib.util.find_spec(package) is None:
            raise UsageError(f"loggers.{name}: the {package} package is not installed; pip install {package} "
                             f"(on every node of the cluster), or drop loggers.{name}")
        cls = getattr(importlib.import_module(module), class_name)
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            valid = [p for p in params if p != "self"]
            unknown = sorted(set(options) - set(valid))
            if unknown:
                raise UsageError(f"loggers.{name}.{unknown[0]}: not an option of Ray's {class_name}; valid: "
                                 f"{', '.join(valid)}")
        callbacks.append(cls(**{group: sweep.name, **options}))
    return callbacks


def _trainable(sweep: SweepConfig, sweep_dir: str):
    from bench import distributed
    from bench.registry import included

    trainable = tune.with_parameters(run_trial, sweep_dir=sweep_dir, sweep_name=sweep.name,
                                     cpus=sweep.resources.cpu, cwd=os.getcwd(), includes=tuple(included()))
    if not any(distributed.is_distributed(t.model_dump()) for t in sweep.trials()):
        return tune.with_resources(trainable, {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu})
    # a distributed trial's Tune slot is its driver only; its workers hold a placement group of their own
    return tune.with_resources(trainable, distributed.trial_resources(sweep.resources.cpu, sweep.resources.gpu))


def _max_epochs(sweep: SweepConfig) -> int:
    epochs = [t.epochs for t in sweep.trials()]
    if "epochs" in sweep.search.space:
        epochs += [int(v) for v in sweep.search.endpoints("epochs")]
    return max(epochs)


def _tuner(sweep: SweepConfig, sweep_dir: str, jobs: list[dict[str, Any]], quiet: bool, lock: DriverLock | None):
    """A Tuner over `jobs` (explicit configs: Tune samples nothing), writing into the sweep folder. A resumed
    sweep gets a new Tuner over its unfinished jobs: Tune's own experiment state is never read back."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    search = sweep.search
    if search.scheduler == "asha":  # rungs on the engine's epoch: a resumed trial reports from its epoch on
        scheduler = AsyncHyperBandScheduler(time_attr="epoch", metric=search.metric, mode=search.mode,
                                            max_t=_max_epochs(sweep), grace_period=search.grace_period,
                                            reduction_factor=search.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    storage, name = sweep_dir.rstrip("/").rsplit("/", 1)
    run_config = tune.RunConfig(
        name=name, storage_path=storage, verbose=0 if quiet else 1,
        progress_reporter=None if quiet else _reporter(sweep),
        callbacks=[StoreCallback(sweep_dir, sweep.name), *logger_callbacks(sweep), *([lock] if lock else [])],
        sync_config=tune.SyncConfig(sync_artifacts=True),  # each trial's run/ folder goes to its trial folder
        failure_config=tune.FailureConfig(max_failures=0),  # a failed trial is recorded; --resume retries it
        checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.keep_checkpoints),
    )
    from bench import distributed

    # worker groups of distributed trials: no more trials at once than the cluster holds whole (ray#54305)
    concurrent = distributed.max_concurrent([job["trial"] for job in jobs], sweep.resources.cpu, sweep.resources.gpu,
                                            _ray_nodes, sweep.max_concurrent)
    tune_config = tune.TuneConfig(num_samples=1, scheduler=scheduler,
                                  max_concurrent_trials=concurrent, trial_name_creator=_trial_name,
                                  trial_dirname_creator=_trial_dirname,
                                  reuse_actors=True)  # imports (torch, Ray Tune) once per slot, not per trial
    # each Tune trial gets one job as its "point" (key, label, trial config)
    return tune.Tuner(_trainable(sweep, sweep_dir), param_space={"point": tune.grid_search(jobs)},
                      tune_config=tune_config, run_config=run_config)


# ----------------------------------------------------------------------------------------------------------
# Checks before Ray starts, Ray itself


def preflight(sweep: SweepConfig) -> None:
    """Bad input that the config models cannot see on their own: one line, before any Ray work."""
    res = sweep.resources
    for key, value in (("cpu", res.cpu), ("gpu", res.gpu)):
        if value > 1 and value != int(value):
            raise UsageError(f"resources.{key}={value}: fractions are allowed only below 1 (e.g. 0.5); use a whole "
                             f"number above 1")
    if sweep.search.scheduler == "asha" and not EPOCH_METRICS.match(sweep.search.metric):
        raise UsageError(f"search.metric={sweep.search.metric!r} is not a per-epoch metric; use val_acc_last, "
                         f"val_acc_K, train_acc_K, train_loss_K or loss")
    if res.gpu == 0 and any(t.device.startswith("cuda") and t.workers.count == 1 for t in sweep.trials()):
        raise UsageError("device=cuda needs resources.gpu > 0 (Ray hides GPUs from trials that ask for none); "
                         "set resources.gpu=1 (or 0.5 to share) or device=auto")
    if any(t.device.startswith("cuda") and t.workers.count > 1 and t.workers.gpu == 0 for t in sweep.trials()):
        raise UsageError("device=cuda with workers.count > 1 needs workers.gpu > 0 (Ray hides GPUs from workers "
                         "that ask for none); set workers.gpu=1 or device=auto")
    logger_callbacks(sweep)  # a tracker whose package is missing: one line now, not a failed sweep later
    if sweep.report is not None:
        from bench.report import build_report

        allowed = [p for p in inspect.signature(build_report).parameters if p != "sweep_dir"]
        unknown = sorted(set(sweep.report) - set(allowed))
        if unknown:
            raise UsageError(f"report.{unknown[0]}: unknown report option; valid: {', '.join(allowed)}")


def check_data(trials: list[dict[str, Any]]) -> None:
    """Build each distinct data section's splits once, here, as `exitbench train` does before training: a data
    setting that cannot work (val_size larger than the training set, files missing) is one line before Ray
    starts, not a failure in every trial. Only for a local Ray: a cluster's workers may see other files."""
    from bench.datasets import make_splits

    seen = set()
    for raw in trials:
        section = raw["data"]
        key = json.dumps(section, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        make_splits(section, int(raw.get("seed", 0)))


def _check_fits(sweep: SweepConfig, nodes: list[dict[str, float]], where: str) -> None:
    from bench import distributed

    distributed.check_fits([t.model_dump() for t in sweep.trials()], nodes, where)
    res = sweep.resources
    if any(n.get("CPU", 0) >= res.cpu and n.get("GPU", 0) >= res.gpu for n in nodes):
        return
    cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    gpu = max((n.get("GPU", 0) for n in nodes), default=0)
    raise UsageError(f"resources per trial (cpu={res.cpu:g}, gpu={res.gpu:g}) are more than {where} has on one "
                     f"node ({cpu:g} CPUs, {gpu:g} GPUs); lower resources.cpu / resources.gpu")


def _local_machine() -> dict[str, float]:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


class _NoTrialTracebacks(logging.Filter):
    """Tune logs a full traceback per failed trial; the summary names each error and its error.txt instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Trial task failed", "Trials did not complete",
                                                "Experiment has been interrupted"))


def _quiet_logs(quiet: bool) -> None:
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.WARNING)
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTrialTracebacks) for f in logger.filters):
            logger.addFilter(_NoTrialTracebacks())


def connect(address: str | None, quiet: bool) -> bool:
    """Ray for this sweep: the running one (tests), a cluster at `address` / $RAY_ADDRESS, or a local Ray sized
    to this machine. Returns True if this call started or joined Ray (and so should shut it down)."""
    import ray

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new output engine ignores CLIReporter and its columns
    _quiet_logs(quiet)
    address = address or os.environ.get("RAY_ADDRESS")
    host_port = re.fullmatch(r"([A-Za-z0-9.-]+):(\d+)", address or "")
    if host_port:  # Ray itself retries an unreachable address for minutes
        try:
            socket.create_connection((host_port[1], int(host_port[2])), timeout=10).close()
        except OSError as err:
            raise UsageError(f"cannot reach the Ray cluster at {address!r} ({err.strerror or err}); start it with "
                             f"`ray start --head --port {host_port[2]}` or check the address") from None
    if ray.is_initialized():
        return False
    level = logging.ERROR if quiet else logging.WARNING
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=level)
        else:
            # "local": a new instance even if a `ray start` cluster runs here (ray.init() would join it)
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=level)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        hint = "; start one with `ray start --head` or check the address" if address else ""
        raise UsageError(f"cannot start or reach {where}: {_last_line(str(err))}{hint}") from None
    _quiet_logs(quiet)  # ray.init configures its loggers again
    return True


def _ray_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


# ----------------------------------------------------------------------------------------------------------
# One driver per sweep folder


class DriverLock(tune.Callback):
    """`driver.lock` in the sweep folder: the driver's pid, host and start time, and the Ray processes it
    started (pid and start time, refreshed while it runs). A second driver refuses while the owner lives; once
    the owner is dead, the next driver ends the Ray processes the owner started that outlived it (they could
    still be training into the sweep folder), checking each one's start time so a reused pid is never hit,
    and takes the lock over. Only for sweep folders on a local or shared filesystem."""

    def __init__(self, sweep_dir: str):
        self.path = Path(sweep_dir) / LOCK_FILE
        self.owned = False
        self.ray: list[dict[str, float]] = []
        self._recorded = 0.0

    @staticmethod
    def _me() -> dict[str, Any]:
        import psutil

        return {"pid": os.getpid(), "host": socket.gethostname(), "started": psutil.Process().create_time()}

    def _write(self) -> None:
        results.atomic_write_text(self.path, json.dumps({**self._me(), "ray": self.ray}))

    @staticmethod
    def _alive(pid: int, started: float) -> bool:
        import psutil

        try:
            return abs(psutil.Process(pid).create_time() - started) < 0.05
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return False

    def acquire(self) -> None:
        import psutil

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                    pid, host, started = int(owner["pid"]), str(owner["host"]), float(owner["started"])
                except (OSError, ValueError, KeyError, TypeError):
                    owner = None  # cut short while its driver wrote it: no driver got past this point
                if owner is not None and host != socket.gethostname():
                    raise UsageError(f"sweep folder {self.path.parent} is locked by a driver on host {host} (pid "
                                     f"{pid}); if that driver is gone, delete {self.path} and resume again") from None
                if owner is not None and self._alive(pid, started):
                    raise UsageError(f"sweep folder {self.path.parent} is in use by another driver (pid {pid} on "
                                     f"this host); wait for it to end, or end it, then resume") from None
                orphans = [psutil.Process(p["pid"]) for p in (owner or {}).get("ray", [])
                           if self._alive(int(p["pid"]), float(p["started"]))]
                for proc in orphans:  # Ray processes of a dead driver, started by it: still writing here
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
                psutil.wait_procs(orphans, timeout=10)
                if orphans:
                    print(f"exitbench: ended {len(orphans)} Ray processes left by the dead driver {pid}",
                          file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            os.close(fd)
            self._write()
            self.owned = True
            return
        raise UsageError(f"sweep folder {self.path.parent}: another driver took {self.path} at the same time")

    def record_ray(self) -> None:
        """Remember the Ray processes this driver started (all its descendants: GCS, raylet, workers)."""
        import psutil

        if not self.owned:
            return
        procs = []
        for proc in psutil.Process().children(recursive=True):
            try:
                procs.append({"pid": proc.pid, "started": proc.create_time()})
            except psutil.Error:
                pass
        if procs != self.ray:
            self.ray = procs
            self._write()
        self._recorded = time.time()

    def on_step(self, iteration, trials, **info):
        if self.ray and time.time() - self._recorded > 2:  # new trial workers
            self.record_ray()

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.ray:
            self.record_ray()

    def release(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False


# ----------------------------------------------------------------------------------------------------------
# Running and resuming


@dataclass
class Outcome:
    sweep_dir: str
    sweep: SweepConfig
    trials: int = 0
    finished: int = 0
    stopped: int = 0
    unfinished: int = 0  # interrupted (Ctrl-C): `--resume` continues them
    failed: list[tuple[str, str, str, str]] = field(default_factory=list)  # (trial id, label, error, trial dir)


def _outcome(jobs: list[dict[str, Any]], sweep: SweepConfig, sweep_dir: str) -> Outcome:
    """Counted from the sweep's own state (its jobs and the store), whichever Tuner ran which job."""
    store = Store(sweep_dir)
    out = Outcome(sweep_dir, sweep, trials=len(jobs))
    for job in jobs:
        record = store.read(job["key"])
        if record is None:
            out.unfinished += 1
        elif record["status"] == "finished":
            out.finished += 1
        elif record["status"] == "stopped":
            out.stopped += 1
        else:
            error = record.get("error") or "no error was recorded"
            out.failed.append((job["key"], job["label"], error, f"{sweep_dir}/{trial_dirname(job)}"))
    return out


def sweep_location(storage_path: str, name: str) -> str:
    if is_uri(storage_path):
        return f"{storage_path.rstrip('/')}/{name}"
    return str(Path(storage_path).expanduser().resolve() / name)


def _check_storage(storage_path: str) -> None:
    if not is_uri(storage_path):
        check_output_dir(storage_path, f"storage_path={storage_path}")


def _read_jobs(sweep_dir: str) -> dict[str, Any] | None:
    text = _read_text(f"{sweep_dir}/{JOBS_FILE}")
    if text is None:
        return None
    try:
        state = json.loads(text)
        state["jobs"] = [dict(job, key=str(job["key"]), label=str(job["label"]), trial=dict(job["trial"]))
                         for job in state["jobs"]]
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{sweep_dir}/{JOBS_FILE} is not a job list written by exitbench ({err}); the sweep "
                         f"cannot be continued, start it again under another name") from None
    return state


def run_sweep(sweep: SweepConfig, *, address: str | None = None, quiet: bool = False) -> Outcome:
    """Start a new sweep in `<storage_path>/<name>` (which must not exist yet); returns the outcome."""
    if not NAME.match(sweep.name):
        raise UsageError(f"sweep name {sweep.name!r}: use letters, digits, '.', '_' or '-' (a single folder name)")
    _check_storage(sweep.storage_path)
    sweep_dir = sweep_location(sweep.storage_path, sweep.name)
    if any(_read_text(f"{sweep_dir}/{f}") is not None for f in (SWEEP_FILE, JOBS_FILE, "tuner.pkl")):
        raise UsageError(f"sweep {sweep.name!r} already exists in {sweep_dir}; continue it with `exitbench sweep "
                         f"--resume {sweep.name}` or choose another --name")
    sweep = sweep.model_copy(update={"storage_path": sweep_dir.rsplit("/", 1)[0]})
    preflight(sweep)
    jobs = expand(sweep, uuid.uuid4().hex[:5])
    if not (address or os.environ.get("RAY_ADDRESS")):
        check_data([job["trial"] for job in jobs])
    return _fit(sweep, sweep_dir, jobs, address, quiet, new=True)


def _resume_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    from bench.config import parse_overrides

    pairs = []
    for key, value in parse_overrides(overrides):
        path = key.removeprefix("base.")
        if path.split(".")[0] in ("grid", "seeds", "search", "resources", "name", "storage_path", "report",
                                  "max_concurrent", "keep_checkpoints", "seed"):
            raise UsageError(f"--resume {key}=...: only trial fields (e.g. optim.lr=0.05) may change on resume; "
                             f"the grid, seeds and sweep settings stay as the sweep defined them")
        pairs.append((path, value))
    return pairs


def resume_sweep(name_or_dir: str, storage_path: str = "runs", *, address: str | None = None,
                 quiet: bool = False, overrides: list[str] = ()) -> Outcome:
    """Continue sweep `name_or_dir` (a name under `storage_path`, or a sweep folder): unfinished and failed
    trials continue from their last checkpoints, finished ones are kept as they are. With `overrides`
    (trial fields, e.g. optim.lr=0.05) the unfinished and failed trials start again from epoch 0 with those
    settings; the job list records them, and so does each retried trial's record (summary.retried_with)."""
    if NAME.match(name_or_dir):
        sweep_dir = sweep_location(storage_path, name_or_dir)
    else:
        sweep_dir = name_or_dir if is_uri(name_or_dir) else str(Path(name_or_dir).expanduser().resolve())
    state = _read_jobs(sweep_dir)  # the whole definition (sweep.yaml is its readable copy)
    text = _read_text(f"{sweep_dir}/{SWEEP_FILE}")
    if state is None and text is None:
        raise UsageError(f"--resume {name_or_dir}: no sweep there ({sweep_dir}/{SWEEP_FILE} does not exist); give "
                         f"the name of a sweep under storage_path={storage_path} or its folder")
    if state is None:
        raise UsageError(f"--resume: {sweep_dir} has no {JOBS_FILE} (written when a sweep starts; sweeps of older "
                         f"exitbench versions cannot be continued); start it again under another name")
    if "sweep" in state:
        sweep = validate_sweep(state["sweep"])
    else:
        try:
            sweep = validate_sweep(yaml.safe_load(text or "{}"))
        except (yaml.YAMLError, AttributeError) as err:
            raise UsageError(f"--resume: {sweep_dir}/{SWEEP_FILE} is not a sweep written by exitbench "
                             f"({_describe(err)})") from None
    preflight(sweep)
    jobs = state["jobs"]
    changes = _resume_overrides(list(overrides))
    if changes:
        store = Store(sweep_dir)
        retried = []
        for job in jobs:
            if store.status(job["key"]) in ("finished", "stopped"):
                continue  # the overrides apply to unfinished and failed trials only
            raw = copy.deepcopy(job["trial"])
            for path, value in changes:
                _set_path(raw, path, copy.deepcopy(value))
            from bench.config import validate_trial

            cfg = validate_trial(raw, where=f"--resume override of trial {job['key']} ({job['label']})")
            raw = cfg.model_dump()
            raw["progress"] = False
            retried.append((job, raw))
        if not retried:
            raise UsageError(f"--resume with {' '.join(overrides)}: every trial of {sweep_dir} is finished; "
                             f"nothing to retry with changed settings")
        if not (address or os.environ.get("RAY_ADDRESS")):
            check_data([raw for _, raw in retried])
        lock = _acquire(sweep_dir)
        try:
            for job, raw in retried:  # the old settings' checkpoints go first: the new settings start from 0
                fs, root = _fs(f"{sweep_dir}/{trial_dirname(job)}")
                import pyarrow.fs as pafs

                for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
                    if info.type == pafs.FileType.Directory and (CHECKPOINT_DIR.fullmatch(info.base_name)
                                                                 or info.base_name.startswith(RESUME_DIR)):
                        fs.delete_dir(info.path)
                job["trial"] = raw
                job["retried_with"] = [*job.get("retried_with", []), *overrides]
            _write_text(f"{sweep_dir}/{JOBS_FILE}", json.dumps(state, indent=1))
        except BaseException:
            if lock:
                lock.release()
            raise
        return _fit(sweep, sweep_dir, jobs, address, quiet, new=False, lock=lock)
    return _fit(sweep, sweep_dir, jobs, address, quiet, new=False)


def _acquire(sweep_dir: str) -> DriverLock | None:
    if is_uri(sweep_dir):
        return None
    lock = DriverLock(sweep_dir)
    lock.acquire()
    return lock


def _fit(sweep: SweepConfig, sweep_dir: str, jobs: list[dict[str, Any]], address: str | None, quiet: bool,
         new: bool, lock: DriverLock | None = None) -> Outcome:
    import ray

    if not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized():
        _check_fits(sweep, [_local_machine()], "this machine")  # before Ray starts
    if not new:
        lock = lock or _acquire(sweep_dir)  # before Ray starts: a second driver stops here
    started_ray = False
    try:
        store = Store(sweep_dir)
        todo = [job for job in jobs if store.status(job["key"]) not in ("finished", "stopped")]
        if todo:  # a new sweep writes nothing until Ray is up and fits its trials
            started_ray = connect(address, quiet)
            _check_fits(sweep, _ray_nodes(), "the Ray cluster")
        if new:  # jobs.json first: it alone is enough to resume (it holds the sweep too)
            lock = _acquire(sweep_dir)
            _write_text(f"{sweep_dir}/{JOBS_FILE}", json.dumps({"sweep": sweep.model_dump(), "jobs": jobs}, indent=1))
            _write_text(f"{sweep_dir}/{SWEEP_FILE}", yaml.safe_dump(sweep.model_dump(), sort_keys=False))
        if todo:
            if started_ray and lock and not (address or os.environ.get("RAY_ADDRESS")):
                lock.record_ray()
            _tuner(sweep, sweep_dir, todo, quiet, lock).fit()
        if not is_uri(sweep_dir) and Path(sweep_dir, "store", "runs").is_dir():
            results.compact(sweep_dir, settle=True)  # one parquet file per table: reports open 4, not 4 per trial
        return _outcome(jobs, sweep, sweep_dir)
    finally:
        if started_ray:
            ray.shutdown()
        if lock:
            lock.release()


def _print_summary(outcome: Outcome) -> None:
    parts = [f"{outcome.finished} finished", f"{len(outcome.failed)} failed"]
    if outcome.stopped:
        parts.append(f"{outcome.stopped} stopped early by ASHA")
    if outcome.unfinished:
        parts.append(f"{outcome.unfinished} unfinished")
    print(f"sweep: {outcome.trials} trials: {', '.join(parts)}")
    for tid, label, error, trial_dir in outcome.failed:
        print(f"  failed {tid} ({label}): {error}  [traceback: {trial_dir}/error.txt]")
    if outcome.unfinished or outcome.failed:
        print(f"continue (unfinished and failed trials): exitbench sweep --resume {outcome.sweep_dir}")
    if outcome.failed:
        print(f"or retry them with other settings: exitbench sweep --resume {outcome.sweep_dir} optim.lr=...")
    print(f"results store: {outcome.sweep_dir}/store (bench.results.load; `exitbench report {outcome.sweep_dir}`)")


def cli_sweep(args) -> int:
    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None  # `sweep key=value ...`: no file
    if args.resume:
        if args.name and args.name != args.resume:
            raise UsageError(f"--name {args.name} and --resume {args.resume} disagree; give only --resume NAME")
        raw = read_yaml(resolve_config(args.config)) if args.config else {}
        changes = [o for o in args.overrides if not o.startswith("storage_path=")]
        storage = raw.get("storage_path", "runs")
        for item in args.overrides:
            if item.startswith("storage_path="):
                storage = item.partition("=")[2] or storage
        outcome = resume_sweep(args.resume, str(storage), address=args.address, quiet=args.quiet,
                               overrides=changes)
    else:
        path = resolve_config(args.config) if args.config else None
        if path is None:
            if not DEFAULT_SWEEP.is_file():
                raise UsageError(f"no sweep file given and the bundled default sweep {DEFAULT_SWEEP} does not exist; "
                                 f"pass SWEEP.yaml")
            path = DEFAULT_SWEEP
        sweep = load_sweep(path, args.overrides)
        if args.name:
            sweep = sweep.model_copy(update={"name": args.name})
        outcome = run_sweep(sweep, address=args.address, quiet=args.quiet)
    _print_summary(outcome)
    sweep = outcome.sweep
    if sweep.report is not None and outcome.finished and not is_uri(outcome.sweep_dir):
        from bench.report import build_report

        written = build_report(outcome.sweep_dir, **sweep.report)
        print(f"report: {len(written)} files in {written[0].parent}" if written else "report: nothing written")
    sys.stdout.flush()
    return 1 if outcome.failed else 130 if outcome.unfinished else 0
