"""Sweeps on Ray Tune: real sweeps of tiny trials on one shared Ray, a driver killed and resumed, failures,
bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench import results

TINY = {
    "data": {"name": "synthetic", "num_classes": 4, "image_size": 8, "train_size": 96, "test_size": 40,
             "val_size": 0.25},
    "backbone": {"name": "tiny", "widths": [4, 8]},
    "epochs": 2,
    "batch_size": 16,
    "device": "cpu",
}
TWO_METHODS = {"method": [{"name": "uniform"}, {"name": "uniform", "exit_weights": [0.5, 1.0]}]}


def sweep_file(tmp_path: Path, name: str, **changes) -> Path:
    raw = {"name": name, "base": json.loads(json.dumps(TINY)), "grid": TWO_METHODS, "seeds": [0, 1],
           "resources": {"cpu": 1}, "storage_path": str(tmp_path / "runs")}
    raw.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exitbench: error: "), err
    return lines[0]


@pytest.mark.slow
def test_sweep_two_methods_two_seeds_fills_the_store(ray_session, run_cli, tmp_path):
    code, out, err = run_cli("sweep", sweep_file(tmp_path, "grid"), "--quiet")
    assert code == 0, out + err
    assert "4 trials: 4 finished, 0 failed" in out
    sweep_dir = tmp_path / "runs" / "grid"
    tables = results.load(sweep_dir)
    runs = tables.runs
    assert len(runs) == 4 and runs["trial_id"].is_unique and set(runs["status"]) == {"finished"}
    assert sorted(runs["seed"]) == [0, 0, 1, 1] and set(runs["sweep"]) == {"grid"}
    assert sorted(runs["config.method.exit_weights"].fillna("all ones")) == ["[0.5, 1.0]"] * 2 + ["all ones"] * 2
    assert (runs["config.progress"] == False).all()  # noqa: E712  (no tqdm inside workers)
    assert len(tables.exits) == 4 * 2 and len(tables.budgets) == 4 * 39
    assert sorted(tables.epochs.groupby("trial_id")["epoch"].apply(list).tolist()) == [[1, 2]] * 4
    for tid in runs["trial_id"]:  # Ray's trial folders: the engine's checkpoints and the run outputs
        trial_dir = next(sweep_dir.glob(f"{tid}_*"))
        assert (trial_dir / "run" / "result.json").is_file() and (trial_dir / "run" / "logits.pt").is_file()
        assert sorted(p.name for p in trial_dir.glob("checkpoint_*/checkpoint.pt"))
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["name"] == "grid"

    code, _, err = run_cli("sweep", sweep_file(tmp_path, "grid"))  # the name is taken now
    assert code == 2 and "already exists" in one_line(err) and "--resume grid" in err


@pytest.mark.slow
def test_failing_trial_is_recorded_and_others_finish(ray_session, run_cli, tmp_path):
    data = [dict(TINY["data"]), dict(TINY["data"], noise=float("inf"))]  # inf inputs -> NaN loss
    path = sweep_file(tmp_path, "fails", grid={"data": data}, seeds=[0], base=dict(TINY, epochs=1))
    code, out, _ = run_cli("sweep", path, "--quiet")
    assert code == 1 and "2 trials: 1 finished, 1 failed" in out and "TrainingDiverged" in out
    runs = results.load(tmp_path / "runs" / "fails").runs.set_index("config.data.noise")
    assert runs.loc[1.0, "status"] == "finished" and pd_isna(runs.loc[1.0, "error"])
    assert runs.loc[float("inf"), "status"] == "failed"
    assert runs.loc[float("inf"), "error"].startswith("TrainingDiverged: loss is nan at epoch 1")


@pytest.mark.slow
def test_asha_stopped_trials_are_stored_as_stopped(ray_session, run_cli, tmp_path):
    """One trial at a time, learning rates best first: ASHA (grace 1, factor 2, 3 epochs) stops the trial
    with lr 1e-6 at its first rung, below the others' median training loss. It is stored as `stopped` with
    the epochs it trained, and the report counts it neither as a seed nor as a failure."""
    from bench.report import build_report

    path = sweep_file(tmp_path, "asha", base=dict(TINY, epochs=3), grid={"optim.lr": [0.2, 0.1, 1e-6]}, seeds=[0],
                      max_concurrent=1, search={"scheduler": "asha", "metric": "loss", "mode": "min"})
    code, out, err = run_cli("sweep", path, "--quiet")
    assert code == 0, out + err
    runs = results.load(tmp_path / "runs" / "asha").runs.set_index("config.optim.lr")
    assert runs.loc[1e-6, "status"] == "stopped" and pd_isna(runs.loc[1e-6, "error"])
    assert runs.loc[0.2, "status"] == "finished"
    stopped = int((runs["status"] == "stopped").sum())
    assert f"3 trials: {3 - stopped} finished, 0 failed, {stopped} stopped early by ASHA" in out
    epochs = results.load(tmp_path / "runs" / "asha").epochs
    trained = epochs[epochs["trial_id"] == runs.loc[1e-6, "trial_id"]]["epoch"].tolist()
    assert 1 <= len(trained) < 3
    build_report(tmp_path / "runs" / "asha", tmp_path / "report", plots=False)
    table = (tmp_path / "report" / "table.md").read_text()
    assert f"3 trials: {3 - stopped} finished, 0 failed, {stopped} stopped early by the scheduler" in table
    assert "(+1 stopped)" in table and "failed)" not in table
    assert (tmp_path / "report" / "failed.csv").read_text().count("\n") <= 1  # the header only


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(ray_session, run_cli, tmp_path):
    data = dict(TINY["data"], train_size=400)  # epochs long enough to kill the driver inside a trial
    path = sweep_file(tmp_path, "killed", base=dict(TINY, data=data, epochs=4), max_concurrent=1)
    sweep_dir = tmp_path / "runs" / "killed"
    records = sweep_dir / "store" / "records"

    def mid_way() -> list[str]:  # trials with 2 checkpoints but no record yet ("<trial id>_<label>" folders)
        started = {"_".join(d.parent.name.split("_")[:2]) for d in sweep_dir.glob("*_*/checkpoint_000001")}
        return sorted(started - {p.stem for p in records.glob("*.json")})

    # Tune saves its experiment state every step (not every 10 s), so it knows the checkpoints on disk at the kill
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS="", TUNE_GLOBAL_CHECKPOINT_S="0")
    driver = subprocess.Popen([sys.executable, "-m", "bench", "sweep", str(path), "--quiet"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and driver.poll() is None and not (list(records.glob("*.json")) and mid_way()):
            time.sleep(0.05)
        assert driver.poll() is None, "the sweep ended before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)  # the driver only, as a crash would; its local Ray goes with it
        driver.wait()
    finally:
        _kill_group(driver.pid)
    killed_mid_way = mid_way()
    assert killed_mid_way, "no trial was killed part-way"
    done_before = {p.stem: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert 1 <= len(done_before) < 4

    code, out, err = run_cli("sweep", "--resume", "killed", f"storage_path={tmp_path / 'runs'}", "--quiet")
    assert code == 0, out + err
    assert "4 trials: 4 finished, 0 failed" in out
    tables = results.load(tmp_path / "runs" / "killed")
    assert len(tables.runs) == 4 and tables.runs["trial_id"].is_unique
    assert set(tables.runs["status"]) == {"finished"}
    assert sorted(tables.epochs.groupby("trial_id")["epoch"].apply(list).tolist()) == [[1, 2, 3, 4]] * 4
    assert len(tables.exits) == 4 * 2 and len(tables.budgets) == 4 * 39
    for tid, mtime in done_before.items():  # finished before the kill: not run (nor stored) again
        assert (records / f"{tid}.json").stat().st_mtime_ns == mtime
    for tid in killed_mid_way:  # continued from its checkpoint (Tune counts iterations since the restore) ...
        last = json.loads(next(sweep_dir.glob(f"{tid}_*/result.json")).read_text().splitlines()[-1])
        assert last["iterations_since_restore"] < last["training_iteration"] == 4
    _same_as_uninterrupted(sweep_dir, tables, tmp_path / "clean")  # ... and ends exactly where a clean run ends

    code, out, _ = run_cli("sweep", "--resume", "killed", f"storage_path={tmp_path / 'runs'}", "--quiet")
    assert code == 0 and "4 trials: 4 finished, 0 failed" in out  # nothing left to do, nothing run twice
    for tid, mtime in done_before.items():
        assert (records / f"{tid}.json").stat().st_mtime_ns == mtime


def _same_as_uninterrupted(sweep_dir: Path, tables, scratch: Path) -> None:
    """Every trial, killed part-way or not, ends exactly where one uninterrupted run of its config ends."""
    import torch

    from bench import train
    from bench.config import validate_trial

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the 1-CPU trials: the same reduction order
    try:
        for tid in tables.runs["trial_id"]:
            cfg = validate_trial(results.load_record(sweep_dir, tid).config)
            clean = train.run(cfg, scratch / tid)
            losses = tables.epochs.loc[tables.epochs["trial_id"] == tid].sort_values("epoch")["loss"].tolist()
            top1 = tables.exits.loc[tables.exits["trial_id"] == tid].sort_values("exit")["top1"].tolist()
            assert losses == pytest.approx([e["loss"] for e in clean.epochs], rel=1e-6), tid
            assert top1 == [e["top1"] for e in clean.exits], tid
    finally:
        torch.set_num_threads(threads)


def _kill_group(pgid: int) -> None:
    """The killed driver's local Ray processes that outlive it (they share its process group)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize(
    "changes, overrides, message",
    [
        ({"grid": {"optim.lrx": [0.1]}}, [], "grid.optim.lrx: no such trial field"),
        ({"grid": {"optim.lr": []}}, [], "grid.optim.lr: empty axis"),
        ({}, ["resources.cpu=512"], "resources per trial (cpu=512, gpu=0) are more than"),
        ({}, ["resources.cpu=1.5"], "resources.cpu=1.5: fractions are allowed only below 1"),
        ({"search": {"scheduler": "asha", "metric": "accuracy"}}, [], "search.metric='accuracy'"),
        ({"search": {"space": {"optim.lr": {"loguniform": [0, 1]}}}}, [], "loguniform needs low > 0"),
        ({"search": {"space": {"method.nope": {"choice": [1, 2]}}}}, [], "unknown field 'method.nope'"),
        ({}, ["base.device=cuda"], "device=cuda needs resources.gpu > 0"),
        ({}, ["name=a/b"], "sweep name 'a/b'"),
        ({}, ["--address", "127.0.0.1:1"], "cannot reach the Ray cluster at '127.0.0.1:1'"),
    ],
)
def test_bad_sweeps_are_one_line_exit_2(run_cli, tmp_path, changes, overrides, message):
    path = sweep_file(tmp_path, "bad", **changes)
    code, out, err = run_cli("sweep", path, *overrides)
    assert code == 2 and message in one_line(err), err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_resume_of_a_missing_sweep_is_one_line_exit_2(run_cli, tmp_path):
    code, _, err = run_cli("sweep", "--resume", "nosuch", f"storage_path={tmp_path}")
    assert code == 2 and "--resume nosuch: no sweep there" in one_line(err)
    code, _, err = run_cli("sweep", "--resume", "nosuch", "epochs=3")
    assert code == 2 and "only storage_path=... may be given" in one_line(err)


def test_missing_default_sweep_is_one_line_exit_2(run_cli, monkeypatch, tmp_path):
    from bench import tune

    monkeypatch.setattr(tune, "DEFAULT_SWEEP", tmp_path / "default.yaml")
    code, _, err = run_cli("sweep")
    assert code == 2 and "bundled default sweep" in one_line(err)


def test_search_space_samples_apply_to_grid_points():
    from bench.config import validate_sweep
    from bench.tune import grid_points, trial_dict

    sweep = validate_sweep({"base": TINY, "grid": TWO_METHODS, "seeds": [3],
                            "search": {"space": {"optim.lr": {"loguniform": [0.01, 0.5]}}}})
    points = grid_points(sweep)
    assert [p["label"] for p in points] == ["uniform-synthetic-tiny-s3"] * 2
    raw = trial_dict({"point": points[1], "search": {"optim.lr": 0.05}})
    assert raw["optim"]["lr"] == 0.05 and raw["method"]["exit_weights"] == [0.5, 1.0] and raw["progress"] is False


def test_store_on_a_uri_round_trips(tmp_path):
    from bench.results import ResultRecord
    from bench.tune import Store

    store = Store(f"file://{tmp_path}/sweep")
    assert store.local and store.root == f"{tmp_path}/sweep"
    store.local = False  # take the object-store path (temp store + pyarrow upload) on a local filesystem
    store.write(ResultRecord(trial_id="t1", status="failed", error="boom", config={"seed": 0}, seed=0))
    assert store.status("t1") == "failed" and store.status("t2") is None
    assert results.load(tmp_path / "sweep").runs.loc[0, "error"] == "boom"


def test_restore_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    """Tune's checkpoint first; if it is gone or cut short, the newest other one that loads."""
    import torch
    from ray import tune

    from bench.tune import restore_checkpoint

    for index, epoch in ((0, 1), (1, 2), (2, 3)):
        folder = tmp_path / "trial" / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        torch.save({"epoch": epoch}, folder / "checkpoint.pt")
    newest = tmp_path / "trial" / "checkpoint_000002" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:20])  # a copy cut short by the crash
    dest = tmp_path / "scratch.pt"
    restore_checkpoint(tune.Checkpoint.from_directory(str(tmp_path / "trial" / "checkpoint_000000")), dest)
    assert torch.load(dest, weights_only=True)["epoch"] == 1  # the one Tune's state (and iteration) names
    restore_checkpoint(tune.Checkpoint.from_directory(str(tmp_path / "trial" / "checkpoint_000002")), dest)
    assert torch.load(dest, weights_only=True)["epoch"] == 2  # truncated: the newest that loads
    restore_checkpoint(tune.Checkpoint(str(tmp_path / "trial" / "checkpoint_000007")), dest)  # gone
    assert torch.load(dest, weights_only=True)["epoch"] == 2
