"""One result schema for every trial, and the results store built from it.

A trial produces one ResultRecord. The store keeps it as four long-form tables, one parquet file per
trial per table (`<sweep>/store/<table>/<trial_id>.parquet`), each written atomically (temp file +
rename), so concurrent trials never share a file and a killed trial never leaves a half file.
`load(sweep_dir)` concatenates them into DataFrames:

- runs:    one row per trial: flattened config (`method.name`, `optim.lr`, ...), seed, status (finished,
           failed, or stopped early by the scheduler), error,
           wall time, images/s, versions, git commit, calibration split, MAC counter
- exits:   one row per trial x exit: top1, top5, macs, params
- budgets: one row per trial x budget: p, test_acc, val_acc, expected_macs, exit_fractions, thresholds
- epochs:  one row per trial x epoch: loss, lr, time, images/s, per-exit train loss/acc and val acc
- latency: one row per trial x policy (exit alone or budget) measured by `exitbench latency`: device, ms per
           image (batch 1: mean, p50, p90; batched), images/s, real-exit vs simulated accuracy
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, Field

TABLES = ("runs", "exits", "budgets", "epochs", "latency")


class ResultRecord(BaseModel):
    trial_id: str
    sweep: str | None = None
    status: Literal["finished", "failed", "stopped"] = "finished"  # stopped: ended early by the scheduler (ASHA)
    error: str | None = None
    config: dict[str, Any]
    seed: int
    versions: dict[str, str] = Field(default_factory=dict)
    git_commit: str | None = None
    wall_time_s: float = 0.0
    train_images_per_s: float = 0.0
    counter: str | None = None  # MAC counter name and version
    calibration: str = "heldout"
    data_info: dict[str, Any] = Field(default_factory=dict)  # split sizes, val-index hash, where files were
    epochs: list[dict[str, Any]] = Field(default_factory=list)
    exits: list[dict[str, Any]] = Field(default_factory=list)  # exit, top1, top5, macs, params
    budgets: list[dict[str, Any]] = Field(default_factory=list)  # p, test_acc, val_acc, expected_macs, ...
    summary: dict[str, Any] = Field(default_factory=dict)
    latency: list[dict[str, Any]] = Field(default_factory=list)  # bench.latency rows, when measured


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}; lists become JSON text (parquet-friendly, hashable)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def to_tables(record: ResultRecord) -> dict[str, pd.DataFrame]:
    ident = {"trial_id": record.trial_id}
    run = {
        **ident,
        "sweep": record.sweep,
        "status": record.status,
        "error": record.error,
        "seed": record.seed,
        "wall_time_s": record.wall_time_s,
        "train_images_per_s": record.train_images_per_s,
        "git_commit": record.git_commit,
        "counter": record.counter,
        "calibration": record.calibration,
        **{f"data.{k}": v for k, v in flatten(record.data_info).items()},
        "versions": json.dumps(record.versions, sort_keys=True),
        **{f"summary.{k}": v for k, v in flatten(record.summary).items()},
        **{f"config.{k}": v for k, v in flatten(record.config).items()},
    }

    def rows(items: list[dict[str, Any]]) -> pd.DataFrame:
        return pd.DataFrame([{**ident, **flatten(item)} for item in items])

    return {"runs": pd.DataFrame([run]), "exits": rows(record.exits), "budgets": rows(record.budgets),
            "epochs": rows(record.epochs), "latency": rows(record.latency)}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; results are meant to be shared and committed
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(record: ResultRecord, sweep_dir: str | Path) -> None:
    """Add (or replace) one trial's rows in the store of `sweep_dir`; the record JSON goes along."""
    store = Path(sweep_dir) / "store"
    for table, df in to_tables(record).items():
        _atomic_parquet(df, store / table / f"{record.trial_id}.parquet")
    atomic_write_text(store / "records" / f"{record.trial_id}.json", record.model_dump_json(indent=1))


@dataclass
class Tables:
    runs: pd.DataFrame
    exits: pd.DataFrame
    budgets: pd.DataFrame
    epochs: pd.DataFrame
    latency: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({"trial_id": []}))

    def __iter__(self):  # `runs, exits, budgets, epochs = load(d)` works as well as `load(d).runs`
        return iter((self.runs, self.exits, self.budgets, self.epochs))


def load(sweep_dir: str | Path) -> Tables:
    """The four tables of a sweep's store (failed trials included, with their error)."""
    from bench.errors import UsageError

    store = Path(sweep_dir) / "store"
    if not (store / "runs").is_dir():
        raise UsageError(f"no results store in {str(sweep_dir)!r} (expected {str(store / 'runs')!r})")
    frames = {}
    for table in TABLES:
        files = sorted((store / table).glob("*.parquet"))
        parts = [pd.read_parquet(f) for f in files]
        parts = [p for p in parts if not p.empty]
        frames[table] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"trial_id": []})
    return Tables(**frames)


def load_record(sweep_dir: str | Path, trial_id: str) -> ResultRecord:
    path = Path(sweep_dir) / "store" / "records" / f"{trial_id}.json"
    return ResultRecord.model_validate_json(path.read_text())
