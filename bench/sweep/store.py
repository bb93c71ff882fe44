"""The sweep's results sink: the store of a sweep folder on a local/shared path or an object-store URI, the
failed record a trial leaves, and the driver's callback that records what a trainable cannot (trials stopped
early by ASHA, trials whose worker died)."""

from __future__ import annotations

import json
import tempfile
from typing import Any

from ray import tune

from bench import results
from bench.errors import last_line
from bench.results import ResultRecord
from bench.runfolder import METRICS
from bench.sweep.grid import trial_dict
from bench.trial.files import is_uri
from bench.trial.provenance import git_commit, package_versions


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


def failed_record(trial_id: str, sweep_name: str, raw: dict[str, Any], error: str, wall_time: float = 0.0,
                   retried_with: list[str] | None = None):
    return ResultRecord(trial_id=trial_id, sweep=sweep_name, status="failed", error=error, config=raw,
                        seed=int(raw.get("seed", 0)), versions=package_versions(), git_commit=git_commit(),
                        wall_time_s=wall_time,
                        summary={"retried_with": " ".join(retried_with)} if retried_with else {})


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
        error = last_line(trial.get_error()) or "the trial's worker failed (see Ray's error file)"
        store.write(failed_record(key, self.sweep_name, trial_dict(trial.config), error))


def _epochs_of(trial) -> list[dict[str, Any]]:
    """Per-epoch metrics of a stopped trial, from its latest persisted checkpoint (it carries metrics.jsonl)."""
    checkpoint = trial.checkpoint
    if checkpoint is None:
        return []
    path = f"{checkpoint.path}/{METRICS}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            text = f.readall().decode()
    except (OSError, FileNotFoundError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
