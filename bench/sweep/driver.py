"""Starting and resuming a sweep: the sweep folder's own state (sweep.yaml, jobs.json, the store, the trial
folders; see bench.sweep) and a Tuner over the jobs that are not finished. Tune's experiment state is never
read back."""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from bench import results
from bench.config import SweepConfig, set_path, validate_sweep
from bench.errors import UsageError, check_output_dir, describe
from bench.runfolder import SWEEP_JOBS
from bench.sweep import cluster
from bench.sweep.grid import NAME, expand, trial_dirname
from bench.sweep.lock import DriverLock
from bench.sweep.loggers import logger_callbacks, reporter
from bench.sweep.runner import trainable
from bench.sweep.store import Store, StoreCallback
from bench.trial.files import CHECKPOINT_DIR, RESUME_DIR, filesystem, is_uri, read_text, write_text

SWEEP_FILE = "sweep.yaml"
JOBS_FILE = SWEEP_JOBS  # the expanded sweep: every trial's key, label and full config, and the sweep's plugins


def _trial_name(trial) -> str:
    return trial.config["point"]["key"]


def _trial_dirname(trial) -> str:
    return trial_dirname(trial.config["point"])


def _max_epochs(sweep: SweepConfig) -> int:
    epochs = [t.epochs for t in sweep.trials()]
    if "epochs" in sweep.search.space:
        epochs += [int(v) for v in sweep.search.endpoints("epochs")]
    return max(epochs)


def _tuner(sweep: SweepConfig, sweep_dir: str, jobs: list[dict[str, Any]], quiet: bool, lock: DriverLock | None):
    """A Tuner over `jobs` (explicit configs: Tune samples nothing), writing into the sweep folder. A resumed
    sweep gets a new Tuner over its unfinished jobs: Tune's own experiment state is never read back."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    # With CheckpointConfig(num_to_keep), Tune snapshots its experiment state whenever a trial has reported that
    # many checkpoints since the last snapshot, and warns (3 lines, each time) when that happens within 5 s of the
    # last one: every epoch of short trials. exitbench never reads that state back (resume uses jobs.json), so
    # the snapshots' cost is no concern here; 0 is Tune's own switch for the warning (a value set by the user wins).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
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
        progress_reporter=None if quiet else reporter(sweep),
        callbacks=[StoreCallback(sweep_dir, sweep.name), *logger_callbacks(sweep), *([lock] if lock else [])],
        sync_config=tune.SyncConfig(sync_artifacts=True),  # each trial's run/ folder goes to its trial folder
        failure_config=tune.FailureConfig(max_failures=0),  # a failed trial is recorded; --resume retries it
        checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.keep_checkpoints),
    )
    # worker groups of distributed trials: no more trials at once than the cluster holds whole (ray#54305)
    concurrent = cluster.max_concurrent([job["trial"] for job in jobs], sweep.resources.cpu, sweep.resources.gpu,
                                            cluster.ray_nodes, sweep.max_concurrent)
    tune_config = tune.TuneConfig(num_samples=1, scheduler=scheduler,
                                  max_concurrent_trials=concurrent, trial_name_creator=_trial_name,
                                  trial_dirname_creator=_trial_dirname,
                                  reuse_actors=True)  # imports (torch, Ray Tune) once per slot, not per trial
    # each Tune trial gets one job as its "point" (key, label, trial config)
    return tune.Tuner(trainable(sweep, sweep_dir), param_space={"point": tune.grid_search(jobs)},
                      tune_config=tune_config, run_config=run_config)


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
    text = read_text(f"{sweep_dir}/{JOBS_FILE}")
    if text is None:
        return None
    try:
        state = json.loads(text)
        state["jobs"] = [dict(job, key=str(job["key"]), label=str(job["label"]), trial=dict(job["trial"]))
                         for job in state["jobs"]]
        state["includes"] = [str(p) for p in state.get("includes") or []]  # none in sweeps before issue 29
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{sweep_dir}/{JOBS_FILE} is not a job list written by exitbench ({err}); the sweep "
                         f"cannot be continued, start it again under another name") from None
    return state


def resume_command(sweep_dir: str, *args: str) -> str:
    """`exitbench [--include P ...] sweep --resume WHERE [ARGS]` that continues the sweep in `sweep_dir`, as it
    works when typed in this folder: the sweep's name where the default storage_path (runs) finds it, else its
    folder (relative to here when below it); this command's plugins (`--include`) come along."""
    from bench.registry import included

    where = sweep_dir
    if not is_uri(sweep_dir):
        name, path, here = Path(sweep_dir).name, Path(sweep_dir), Path.cwd()
        if sweep_location("runs", name) == str(path.resolve()):
            where = name
        elif path.resolve().is_relative_to(here.resolve()):
            where = str(path.resolve().relative_to(here.resolve()))
            where = where if "/" in where else f"./{where}"  # a bare name would be looked up under runs/
    plugins = "".join(f" --include {shlex.quote(p)}" for p in included())
    return f"exitbench{plugins} sweep --resume {shlex.quote(where)}" + "".join(f" {a}" for a in args)


def _include_recorded(state: dict[str, Any], sweep_dir: str) -> None:
    """Import the plugins (`--include`) the sweep was started with, as jobs.json records them, unless this
    command included them already: its configs may name their components."""
    from bench.registry import include, included

    missing = [p for p in state.get("includes") or [] if p not in included()]
    gone = [p for p in missing if not Path(p).exists()]
    if gone and not included():
        raise UsageError(f"--resume: the sweep in {sweep_dir} was started with --include {gone[0]}, which does not "
                         f"exist any more; put it back, or name where it is now with --include before `sweep`")
    missing = [p for p in missing if p not in gone]  # moved: this command's --include stands in for them
    if missing:
        print(f"exitbench: including the sweep's plugins (from its {JOBS_FILE}): {', '.join(missing)}",
              file=sys.stderr)
        include(missing)


def run_sweep(sweep: SweepConfig, *, address: str | None = None, quiet: bool = False) -> Outcome:
    """Start a new sweep in `<storage_path>/<name>` (which must not exist yet); returns the outcome."""
    if not NAME.match(sweep.name):
        raise UsageError(f"sweep name {sweep.name!r}: use letters, digits, '.', '_' or '-' (a single folder name)")
    _check_storage(sweep.storage_path)
    sweep_dir = sweep_location(sweep.storage_path, sweep.name)
    if any(read_text(f"{sweep_dir}/{f}") is not None for f in (SWEEP_FILE, JOBS_FILE, "tuner.pkl")):
        raise UsageError(f"sweep {sweep.name!r} already exists in {sweep_dir}; continue it with "
                         f"`{resume_command(sweep_dir)}` or choose another --name")
    sweep = sweep.model_copy(update={"storage_path": sweep_dir.rsplit("/", 1)[0]})
    cluster.preflight(sweep)
    jobs = expand(sweep, uuid.uuid4().hex[:5])
    if not (address or os.environ.get("RAY_ADDRESS")):
        cluster.check_data([job["trial"] for job in jobs])
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
    text = read_text(f"{sweep_dir}/{SWEEP_FILE}")
    if state is None and text is None:
        raise UsageError(f"--resume {name_or_dir}: no sweep there ({sweep_dir}/{SWEEP_FILE} does not exist); give "
                         f"the name of a sweep under storage_path={storage_path} or its folder")
    if state is None:
        raise UsageError(f"--resume: {sweep_dir} has no {JOBS_FILE} (written when a sweep starts; sweeps of older "
                         f"exitbench versions cannot be continued); start it again under another name")
    _include_recorded(state, sweep_dir)
    if "sweep" in state:
        sweep = validate_sweep(state["sweep"])
    else:
        try:
            sweep = validate_sweep(yaml.safe_load(text or "{}"))
        except (yaml.YAMLError, AttributeError) as err:
            raise UsageError(f"--resume: {sweep_dir}/{SWEEP_FILE} is not a sweep written by exitbench "
                             f"({describe(err)})") from None
    cluster.preflight(sweep)
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
                set_path(raw, path, copy.deepcopy(value))
            from bench.config import validate_trial

            cfg = validate_trial(raw, where=f"--resume override of trial {job['key']} ({job['label']})")
            raw = cfg.model_dump()
            raw["progress"] = False
            retried.append((job, raw))
        if not retried:
            raise UsageError(f"--resume with {' '.join(overrides)}: every trial of {sweep_dir} is finished; "
                             f"nothing to retry with changed settings")
        if not (address or os.environ.get("RAY_ADDRESS")):
            cluster.check_data([raw for _, raw in retried])
        lock = _acquire(sweep_dir)
        try:
            for job, raw in retried:  # the old settings' checkpoints go first: the new settings start from 0
                fs, root = filesystem(f"{sweep_dir}/{trial_dirname(job)}")
                import pyarrow.fs as pafs

                for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
                    if info.type == pafs.FileType.Directory and (CHECKPOINT_DIR.fullmatch(info.base_name)
                                                                 or info.base_name.startswith(RESUME_DIR)):
                        fs.delete_dir(info.path)
                job["trial"] = raw
                job["retried_with"] = [*job.get("retried_with", []), *overrides]
            write_text(f"{sweep_dir}/{JOBS_FILE}", json.dumps(state, indent=1))
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
        cluster.check_fits(sweep, [cluster.local_machine()], "this machine")  # before Ray starts
    if not new:
        lock = lock or _acquire(sweep_dir)  # before Ray starts: a second driver stops here
    started_ray = False
    try:
        store = Store(sweep_dir)
        todo = [job for job in jobs if store.status(job["key"]) not in ("finished", "stopped")]
        if todo:  # a new sweep writes nothing until Ray is up and fits its trials
            started_ray = cluster.connect(address, quiet)
            cluster.check_fits(sweep, cluster.ray_nodes(), "the Ray cluster")
        if new:  # jobs.json first: it alone is enough to resume (it holds the sweep too)
            lock = _acquire(sweep_dir)
            from bench.registry import included

            state = {"sweep": sweep.model_dump(), "includes": included(), "jobs": jobs}  # see _include_recorded
            write_text(f"{sweep_dir}/{JOBS_FILE}", json.dumps(state, indent=1))
            write_text(f"{sweep_dir}/{SWEEP_FILE}", yaml.safe_dump(sweep.model_dump(), sort_keys=False))
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
