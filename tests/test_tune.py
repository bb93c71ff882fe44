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
    # storage_path is not ./runs here: the printed command names the sweep's folder, so it works as printed
    assert code == 2 and "already exists" in one_line(err)
    assert f"`exitbench sweep --resume {sweep_dir.resolve()}`" in err


@pytest.mark.slow
def test_failing_trial_is_recorded_and_others_finish(ray_session, run_cli, tmp_path):
    data = [dict(TINY["data"]), dict(TINY["data"], noise=float("inf"))]  # inf inputs -> NaN loss
    path = sweep_file(tmp_path, "fails", grid={"data": data}, seeds=[0], base=dict(TINY, epochs=1))
    code, out, _ = run_cli("sweep", path, "--quiet")
    assert code == 1 and "2 trials: 1 finished, 1 failed" in out and "TrainingDiverged" in out
    assert "(uniform-synthetic-tiny-noise=inf-s0): TrainingDiverged" in out  # the label names the grid point
    sweep_dir = tmp_path / "runs" / "fails"
    runs = results.load(sweep_dir).runs.set_index("config.data.noise")
    assert runs.loc[1.0, "status"] == "finished" and pd_isna(runs.loc[1.0, "error"])
    assert runs.loc[float("inf"), "status"] == "failed"
    assert runs.loc[float("inf"), "error"].startswith("TrainingDiverged: loss is nan at epoch 1")
    finished = sweep_dir / "store" / "records" / f"{runs.loc[1.0, 'trial_id']}.json"
    mtime = finished.stat().st_mtime_ns

    # retry the failed trial with other settings: applied to it only, from epoch 0, recorded
    code, out, err = run_cli("sweep", "--resume", str(sweep_dir), "data.noise=2.0", "--quiet")
    assert code == 0 and "2 trials: 2 finished, 0 failed" in out, out + err
    runs = results.load(sweep_dir).runs.set_index("trial_id")
    retried = runs.loc[runs["summary.retried_with"].notna()]
    assert list(retried["summary.retried_with"]) == ["data.noise=2.0"] and list(retried["config.data.noise"]) == [2.0]
    assert finished.stat().st_mtime_ns == mtime and pd_isna(runs.loc[finished.stem, "summary.retried_with"])
    jobs = json.loads((sweep_dir / "jobs.json").read_text())["jobs"]
    assert [j.get("retried_with") for j in jobs] == [None, ["data.noise=2.0"]]
    assert jobs[1]["trial"]["data"]["noise"] == 2.0  # a later plain --resume keeps the new settings


@pytest.mark.slow
def test_default_retention_keeps_two_checkpoints_of_a_20_epoch_trial(ray_session, run_cli, tmp_path):
    data = dict(TINY["data"], train_size=32, test_size=8)
    path = sweep_file(tmp_path, "keep", base=dict(TINY, data=data, epochs=20), grid={}, seeds=[0])
    code, out, err = run_cli("sweep", path, "--quiet")
    assert code == 0 and "1 trials: 1 finished" in out, out + err
    (trial_dir,) = (tmp_path / "runs" / "keep").glob("*_uniform-*")
    kept = sorted(p.name for p in trial_dir.glob("checkpoint_*"))
    assert kept == ["checkpoint_000018", "checkpoint_000019"]  # of 20 reported, one per epoch
    assert torch_epoch(trial_dir / kept[-1] / "checkpoint.pt") == 20


def torch_epoch(path: Path) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


@pytest.mark.slow
def test_asha_stopped_trials_are_stored_as_stopped(ray_session, run_cli, tmp_path):
    """One trial at a time, learning rates best first: ASHA (grace 1, factor 2, 3 epochs) stops the trial
    with lr 1e-6 at its first rung, below the others' median training loss. It is stored as `stopped` with
    the epochs it trained, and the report counts it neither as a seed nor as a failure."""
    from bench.report.build import build_report

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


def _driver(path_or_args, env=None) -> subprocess.Popen:
    """A sweep driver in its own process with its own local Ray (killing it must not touch the test's Ray)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS="", **(env or {}))
    args = [str(a) for a in path_or_args]
    return subprocess.Popen([sys.executable, "-m", "bench", "sweep", *args, "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(condition, driver: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None and not condition():
        time.sleep(0.05)
    assert driver.poll() is None, f"the driver ended before {what}: {driver.stderr.read().decode()[-2000:]}"
    assert condition(), f"timed out waiting for {what}"


def _lock_pid(lock: Path) -> int | None:
    try:
        return json.loads(lock.read_text()).get("pid")
    except (OSError, ValueError):  # not there (yet), or taken over right now
        return None


def _ray_pids(lock: Path) -> list[tuple[int, float]]:
    owner = json.loads(lock.read_text())
    return [(p["pid"], p["started"]) for p in owner["ray"]]


def _alive(pid: int, started: float) -> bool:
    from bench.sweep.lock import DriverLock

    return DriverLock._alive(pid, started)


def _truncate_tune_state(sweep_dir: Path) -> None:
    """As a kill during Tune's state save leaves it: tuner.pkl and the newest experiment state at 0 bytes."""
    (sweep_dir / "tuner.pkl").write_bytes(b"")
    newest = max(sweep_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    newest.write_bytes(b"")


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(ray_session, run_cli, tmp_path):
    """SIGKILL the driver mid-trial; truncate Tune's state to 0 bytes; resume in a new driver (which first ends
    the dead driver's Ray processes, while another driver is refused); SIGKILL it while it starts Ray; resume
    again and SIGKILL that one right after it continued a trial from its checkpoint; truncate again; the last
    resume finishes every trial, with metrics equal to uninterrupted runs, and never runs a finished trial
    again."""
    data = dict(TINY["data"], train_size=400)  # epochs long enough to kill the driver inside a trial
    path = sweep_file(tmp_path, "killed", base=dict(TINY, data=data, epochs=4), max_concurrent=1)
    sweep_dir = tmp_path / "runs" / "killed"
    records = sweep_dir / "store" / "records"
    lock = sweep_dir / "driver.lock"

    def mid_way() -> list[str]:  # trials with 2 checkpoints but no record yet ("<key>_<label>" folders)
        started = {"_".join(d.parent.name.split("_")[:2]) for d in sweep_dir.glob("*_*/checkpoint_00000[1-9]")}
        return sorted(started - {p.stem for p in records.glob("*.json")})

    driver = _driver([path])
    try:
        _wait_for(lambda: list(records.glob("*.json")) and mid_way(), driver, "a trial was part-way")
        orphans = _ray_pids(lock)
        os.kill(driver.pid, signal.SIGKILL)  # the driver only, as a crash would: its Ray processes live on
        driver.wait()
        assert orphans and any(_alive(*p) for p in orphans)  # left behind, still running
        killed_mid_way = mid_way()
        done_before = {p.stem: p.stat().st_mtime_ns for p in records.glob("*.json")}
        assert killed_mid_way and 1 <= len(done_before) < 4
        _truncate_tune_state(sweep_dir)

        driver = _driver(["--resume", sweep_dir])
        _wait_for(lambda: _lock_pid(lock) == driver.pid, driver, "the second driver took the lock")
        assert not any(_alive(*p) for p in orphans), "the dead driver's Ray processes were not ended"
        code, _, err = run_cli("sweep", "--resume", str(sweep_dir), "--quiet")  # another driver meanwhile
        assert code == 2 and f"in use by another driver (pid {driver.pid}" in one_line(err)
        _wait_for(lambda: _ray_pids(lock), driver, "the second driver started Ray")
        orphans = _ray_pids(lock)
        os.kill(driver.pid, signal.SIGKILL)  # while it starts Ray and its Tuner
        driver.wait()

        driver = _driver(["--resume", sweep_dir])
        _wait_for(lambda: _lock_pid(lock) == driver.pid, driver, "the third driver took the lock")
        assert not any(_alive(*p) for p in orphans), "the dead driver's Ray processes were not ended"
        _wait_for(lambda: list(sweep_dir.glob("*_*/checkpoint_resume")), driver,
                  "the second driver continued a trial from its checkpoint")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        _truncate_tune_state(sweep_dir)
    finally:
        _kill_group(driver.pid)

    code, out, err = run_cli("sweep", "--resume", "killed", f"storage_path={tmp_path / 'runs'}", "--quiet")
    assert code == 0, out + err
    assert "4 trials: 4 finished, 0 failed" in out
    assert not lock.exists()
    tables = results.load(tmp_path / "runs" / "killed")
    assert len(tables.runs) == 4 and tables.runs["trial_id"].is_unique
    assert set(tables.runs["status"]) == {"finished"}
    assert sorted(tables.epochs.groupby("trial_id")["epoch"].apply(list).tolist()) == [[1, 2, 3, 4]] * 4
    assert len(tables.exits) == 4 * 2 and len(tables.budgets) == 4 * 39
    for tid, mtime in done_before.items():  # finished before the kill: not run (nor stored) again
        assert (records / f"{tid}.json").stat().st_mtime_ns == mtime
    for tid in killed_mid_way:  # continued from its checkpoint, not from epoch 0 ...
        assert next(sweep_dir.glob(f"{tid}_*/checkpoint_resume/checkpoint.pt")).is_file()
    for trial_dir in sweep_dir.glob("*_*-s[01]"):  # retention: at most 2 numbered checkpoints per trial
        assert len(list(trial_dir.glob("checkpoint_0*"))) <= 2, trial_dir
    _same_as_uninterrupted(sweep_dir, tables, tmp_path / "clean")  # ... and ends exactly where a clean run ends

    code, out, _ = run_cli("sweep", "--resume", "killed", f"storage_path={tmp_path / 'runs'}", "--quiet")
    assert code == 0 and "4 trials: 4 finished, 0 failed" in out  # nothing left to do, nothing run twice
    for tid, mtime in done_before.items():
        assert (records / f"{tid}.json").stat().st_mtime_ns == mtime


def _same_as_uninterrupted(sweep_dir: Path, tables, scratch: Path) -> None:
    """Every trial, killed part-way or not, ends exactly where one uninterrupted run of its config ends."""
    import torch

    from bench.config import validate_trial
    from bench.trial import train

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
    code, _, err = run_cli("sweep", "--resume", "nosuch", f"storage_path={tmp_path}", "epochs=3")
    assert code == 2 and "--resume nosuch: no sweep there" in one_line(err)


def test_missing_default_sweep_is_one_line_exit_2(run_cli, monkeypatch, tmp_path):
    from bench.sweep import cli

    monkeypatch.setattr(cli, "DEFAULT_SWEEP", tmp_path / "default.yaml")
    code, _, err = run_cli("sweep")
    assert code == 2 and "bundled default sweep" in one_line(err)


def test_jobs_sample_the_search_space_on_every_grid_point_and_name_their_point():
    from bench.config import validate_sweep
    from bench.sweep.grid import expand, grid_points, trial_dict

    sweep = validate_sweep({"base": TINY, "grid": {**TWO_METHODS, "optim.momentum": [0.0, 0.9]}, "seeds": [3],
                            "search": {"num_samples": 2, "space": {"optim.lr": {"loguniform": [0.01, 0.5]}}}})
    assert [p["label"] for p in grid_points(sweep)] == [
        "uniform-synthetic-tiny-method=uniform-momentum=0-s3", "uniform-synthetic-tiny-method=uniform-momentum=0.9-s3",
        "uniform-synthetic-tiny-exit_weights=[0.5,1.0]-momentum=0-s3",
        "uniform-synthetic-tiny-exit_weights=[0.5,1.0]-momentum=0.9-s3"]
    jobs = expand(sweep, "abcde")
    assert len(jobs) == 8 and [j["key"] for j in jobs[:2]] == ["abcde_00000", "abcde_00001"]
    assert jobs == expand(sweep, "abcde")  # a pure function of the sweep: the same values again
    lrs = [j["trial"]["optim"]["lr"] for j in jobs]
    assert len(set(lrs)) == 8 and all(0.01 <= lr <= 0.5 for lr in lrs)
    assert jobs[5]["label"] == f"uniform-synthetic-tiny-exit_weights=[0.5,1.0]-momentum=0-lr={lrs[5]:.3g}-s3"
    raw = trial_dict({"point": jobs[5]})
    assert raw["method"]["exit_weights"] == [0.5, 1.0] and raw["progress"] is False and raw["seed"] == 3


def test_store_on_a_uri_round_trips(tmp_path):
    from bench.results import ResultRecord
    from bench.sweep.store import Store

    store = Store(f"file://{tmp_path}/sweep")
    assert store.local and store.root == f"{tmp_path}/sweep"
    store.local = False  # take the object-store path (temp store + pyarrow upload) on a local filesystem
    store.write(ResultRecord(trial_id="t1", status="failed", error="boom", config={"seed": 0}, seed=0))
    assert store.status("t1") == "failed" and store.status("t2") is None
    assert results.load(tmp_path / "sweep").runs.loc[0, "error"] == "boom"


def test_restore_takes_the_newest_checkpoint_that_loads_and_keeps_it(tmp_path):
    """The newest by epoch that loads (a copy cut short by a crash does not); it is kept as checkpoint_resume/
    and the numbered ones of the previous attempt go."""
    import torch

    from bench.trial.files import restore_checkpoint

    trial = tmp_path / "trial"
    for index, epoch in ((0, 1), (1, 2), (2, 3)):
        folder = trial / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        torch.save({"epoch": epoch}, folder / "checkpoint.pt")
        (folder / "metrics.jsonl").write_text("{}\n" * epoch)
    newest = trial / "checkpoint_000002" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:20])  # a copy cut short by the crash
    dest = tmp_path / "scratch.pt"
    assert restore_checkpoint(str(trial), dest)
    assert torch.load(dest, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_resume"]
    (trial / "checkpoint_000000").mkdir()  # the next attempt's first checkpoint, cut short
    (trial / "checkpoint_000000" / "metrics.jsonl").write_text("{}\n" * 3)
    assert restore_checkpoint(str(trial), dest) and torch.load(dest, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_resume"]
    assert not restore_checkpoint(str(tmp_path / "empty"), tmp_path / "new.pt") and not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("section,reported", [({}, True), ({"plots": False}, True), (None, False)])
def test_an_empty_report_section_still_reports(run_cli, tmp_path, monkeypatch, section, reported):
    """`report: {}` is a report section (the README: a sweep with a `report:` section writes one), only its
    absence means no report; Ray is replaced by a finished outcome."""
    import bench.report.build
    import bench.sweep.driver

    calls = []
    monkeypatch.setattr(bench.sweep.driver, "run_sweep", lambda sweep, **_: bench.sweep.driver.Outcome(
        str(tmp_path / "runs" / sweep.name), sweep, trials=1, finished=1))
    monkeypatch.setattr(bench.report.build, "build_report", lambda sweep_dir, **kw: calls.append(kw) or [])
    changes = {} if section is None else {"report": section}
    code, out, err = run_cli("sweep", sweep_file(tmp_path, "rep", **changes), "--quiet")
    assert code == 0, out + err
    assert calls == ([section] if reported else []) and ("report: nothing written" in out) == reported
