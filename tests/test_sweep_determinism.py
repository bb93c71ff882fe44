"""A sweep gives the same numbers every time it runs, and the same as `exitbench train` of a trial's config
(issue 14, item 6): seeds, data order and the thread count (recorded in the trial config) fix every float."""

import pandas as pd
import pytest
import yaml

from bench import results
from bench.config import validate_trial

TIMES = ("time_s", "images_per_s")  # wall-clock columns: the only ones allowed to differ


def _tables(sweep_dir):
    tables = results.load(sweep_dir)
    method = tables.runs.set_index("trial_id")["config.method.name"]
    out = {}
    for name in ("epochs", "exits", "budgets"):
        df = getattr(tables, name)
        df = df.assign(method=df["trial_id"].map(method)).drop(columns=["trial_id", *[c for c in TIMES if c in df]])
        out[name] = df.sort_values([c for c in ("method", "epoch", "exit", "budget") if c in df]).reset_index(drop=True)
    return out, tables.runs


@pytest.mark.slow
def test_a_sweep_twice_gives_identical_tables_equal_to_train(ray_session, run_cli, tmp_path):
    raw = {"name": "det", "seeds": [0], "storage_path": str(tmp_path / "runs"),
           "base": {"data": {"name": "digits", "image_size": 8, "val_size": 0.15},
                    "backbone": {"name": "tiny", "widths": [4, 8]}, "epochs": 2, "schedule": {"name": "cosine"}},
           "grid": {"method": [{"name": "uniform"}, {"name": "distill"}]}}  # default resources and concurrency
    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump(raw))
    for name in ("first", "second"):
        code, _, err = run_cli("sweep", path, "--name", name, "--quiet")
        assert code == 0, err
    first, runs = _tables(tmp_path / "runs" / "first")
    second, _ = _tables(tmp_path / "runs" / "second")
    for name in first:
        assert len(first[name]) and list(first[name]["method"].unique()) == ["distill", "uniform"]
        pd.testing.assert_frame_equal(first[name], second[name], check_exact=True)

    # Each trial folder holds Ray Tune's TensorBoard event files (README: Logs)
    trial_dirs = [d for d in (tmp_path / "runs" / "first").iterdir() if (d / "params.json").is_file()]
    assert len(trial_dirs) == 2 and all(list(d.glob("events.out.tfevents.*")) for d in trial_dirs)

    # What made them is recorded: the versions, the thread count (in the config too) ...
    assert (runs["config.threads"] == 1).all()
    record = results.load_record(tmp_path / "runs" / "first", runs["trial_id"].iloc[0])
    assert record.versions["torch_threads"] == "1" and "torch" in record.versions
    # ... and `exitbench train` of the stored config gives the same numbers.
    from bench.trial import train

    again = train.run(validate_trial(record.config), tmp_path / "train")
    strip = [{k: v for k, v in row.items() if k not in TIMES} for row in again.epochs]
    assert strip == [{k: v for k, v in row.items() if k not in TIMES} for row in record.epochs]
    assert again.exits == record.exits and again.summary == record.summary


def test_sweep_trials_run_at_the_sweep_s_thread_count():
    from bench.config import bundled_sweeps, load_sweep
    from bench.sweep import grid

    assert [p["trial"]["threads"] for p in grid.grid_points(load_sweep(bundled_sweeps()["default"]))] == [1] * 9
    two = load_sweep(bundled_sweeps()["default"], ["resources.cpu=2", "seeds=[0]"])
    assert {p["trial"]["threads"] for p in grid.grid_points(two)} == {2}
    fixed = load_sweep(bundled_sweeps()["default"], ["threads=3", "seeds=[0]"])  # a trial field wins
    assert {p["trial"]["threads"] for p in grid.grid_points(fixed)} == {3}
