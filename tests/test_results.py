import json
import os

import pytest

from bench import results
from bench.errors import UsageError
from bench.results import ResultRecord


def record(trial_id, status="finished", error=None, seed=0):
    return ResultRecord(
        trial_id=trial_id, sweep="s", status=status, error=error, seed=seed,
        config={"method": {"name": "uniform", "exit_weights": None}, "optim": {"lr": 0.1}, "seed": seed},
        exits=[] if status == "failed" else [{"exit": 1, "top1": 50.0, "top5": 90.0, "macs": 10, "params": 3},
                                             {"exit": 2, "top1": 60.0, "top5": 95.0, "macs": 20, "params": 6}],
        budgets=[] if status == "failed" else [{"p": 1, "test_acc": 55.0, "val_acc": 56.0, "expected_macs": 12.5,
                                                "exit_fractions": [0.75, 0.25], "thresholds": [0.9, None]}],
        epochs=[{"epoch": 1, "loss": 1.5}],
        summary={} if status == "failed" else {"auc": 57.0},
    )


def test_write_load_round_trip(tmp_path):
    results.write(record("a"), tmp_path)
    results.write(record("b", status="failed", error="ValueError: boom", seed=1), tmp_path)
    tables = results.load(tmp_path)
    runs = tables.runs.set_index("trial_id")
    assert set(runs.index) == {"a", "b"}
    assert runs.loc["b", "status"] == "failed" and runs.loc["b", "error"] == "ValueError: boom"
    assert runs.loc["a", "config.method.name"] == "uniform" and runs.loc["a", "config.optim.lr"] == 0.1
    assert runs.loc["a", "summary.auc"] == 57.0
    assert len(tables.exits) == 2 and list(tables.exits["macs"]) == [10, 20]
    assert json.loads(tables.budgets.loc[0, "exit_fractions"]) == [0.75, 0.25]
    assert len(tables.epochs) == 2
    assert results.load_record(tmp_path, "a") == record("a")


def test_rewrite_replaces_rows_and_leaves_no_temp_files(tmp_path):
    results.write(record("a"), tmp_path)
    results.write(record("a"), tmp_path)
    assert len(results.load(tmp_path).runs) == 1
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    mode = os.stat(tmp_path / "store" / "runs" / "a.parquet").st_mode & 0o777
    assert mode == 0o644


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    results.write(record("a"), tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pandas.DataFrame.to_parquet", broken)
    with pytest.raises(OSError):
        results.write(record("a", seed=5), tmp_path)
    assert results.load(tmp_path).runs.loc[0, "seed"] == 0
    assert not [p for p in (tmp_path / "store").rglob("*.tmp")]


def test_load_without_store_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no results store"):
        results.load(tmp_path)
