"""The compacted results store: reading it always equals reading every per-trial file, whatever ran between
(new trials, resumed trials rewriting their files, removed files, copies, a killed compaction)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pytest

from bench import results
from bench.errors import UsageError
from bench.results import ResultRecord


def record(trial_id, method="uniform", seed=0, status="finished", epochs=3, shift=0.0):
    """A record shaped like a real one: other methods have other config fields; failed trials have no exits."""
    params = {"uniform": {"name": "uniform"}, "l2w": {"name": "l2w", "epsilon": 0.8, "meta_grad": "jvp"},
              "distill": {"name": "distill", "temperature": 3}}[method]
    finished = status == "finished"
    return ResultRecord(
        trial_id=trial_id, sweep="s", status=status, error=None if finished else "ValueError: boom", seed=seed,
        config={"data": {"name": "digits" if seed < 2 else "cifar10"}, "method": params,
                "optim": {"lr": 0.1, "milestones": [0.5, 0.75]}, "seed": seed, "epochs": epochs},
        exits=[{"exit": k, "top1": 50.0 + k + shift, "top5": 90.0, "macs": 10 * k, "params": 3 * k}
               for k in (1, 2, 3)] if finished else [],
        budgets=[{"p": p, "test_acc": 55.0 + p + shift, "val_acc": 56.0, "expected_macs": 12.5 + p,
                  "exit_fractions": [0.5, 0.25, 0.25], "thresholds": [0.9, None, None]} for p in (1, 2)]
        if finished else [],
        epochs=[{"epoch": e + 1, "loss": 1.5 / (e + 1) + shift, "lr": 0.1, "val_acc_1": 40.0 + e}
                for e in range(epochs)],
        summary={"auc": 57.0 + shift} if finished else {},
        latency=[{"policy": f"exit {k}", "device": "cpu", "ms_mean": 1.0 + k + shift} for k in (1, 2)]
        if finished and seed % 2 == 0 else [],  # measured for some trials only
    )


def per_trial_read(sweep_dir) -> dict[str, pd.DataFrame]:
    """The store read as it was before compaction existed: every per-trial file in name order, concatenated."""
    out = {}
    for table in results.TABLES:
        parts = [pd.read_parquet(f) for f in sorted((Path(sweep_dir) / "store" / table).glob("*.parquet"))]
        parts = [p for p in parts if not p.empty]
        out[table] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"trial_id": []})
    return out


def same(got: results.Tables, want: dict[str, pd.DataFrame]) -> None:
    """Same columns, rows and values; same dtypes, except that a column null in some trials and typed in others
    (`error`: None, or a message) now has its type rather than pandas' concat's `object`."""
    for table in results.TABLES:
        a, b = getattr(got, table), want[table]
        assert list(a.columns) == list(b.columns), table
        for col in a:
            assert a[col].dtype == b[col].dtype or (b[col].dtype == object and b[col].map(type).nunique() > 1), col
        # all-null object columns: a missing cell is None here and NaN in pandas' concat (both pd.isna)
        assert a.astype(object).where(a.notna(), None).equals(b.astype(object).where(b.notna(), None)), table


def sweep(tmp_path, n=6):
    methods = ["uniform", "l2w", "distill"]
    for i in range(n):
        results.write(record(f"t{i:02d}", methods[i % 3], seed=i % 3, status="failed" if i == 4 else "finished",
                             epochs=2 + i % 3), tmp_path)
    results.write(record("t0-x", seed=1), tmp_path)  # sorts before t00 by file name, after it by id


def test_compaction_round_trip_keeps_every_row_and_dtype(tmp_path):
    sweep(tmp_path)
    want = per_trial_read(tmp_path)
    same(results.load(tmp_path, compact=False), want)  # the per-trial read path
    assert not (tmp_path / "store" / "compacted").exists()
    done = results.compact(tmp_path)
    assert [(c.table, c.trials, c.read, c.written) for c in done] == [(t, 7, 7, True) for t in results.TABLES]
    same(results.load(tmp_path), want)
    assert [c.written for c in results.compact(tmp_path)] == [False] * len(results.TABLES)  # nothing new: left as it is
    assert not list((tmp_path / "store").rglob("*.tmp"))
    assert oct(os.stat(tmp_path / "store" / "compacted" / "epochs.parquet").st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_reading_in_chunks_is_the_same_as_reading_every_file(tmp_path, monkeypatch, chunk):
    # Chunks of other methods' trials (other columns), a failed trial (no exits) alone in a chunk, int / float.
    monkeypatch.setattr(results, "READ_CHUNK", chunk)
    sweep(tmp_path)
    want = per_trial_read(tmp_path)
    same(results.load(tmp_path, compact=False), want)
    results.compact(tmp_path)
    same(results.load(tmp_path), want)


def test_trial_written_after_compaction_is_read(tmp_path):
    sweep(tmp_path)
    results.compact(tmp_path)
    results.write(record("t99", "l2w", seed=5), tmp_path)  # a column (data cifar10) and a trial it lacks
    got = results.load(tmp_path, compact=False)
    same(got, per_trial_read(tmp_path))
    assert (got.runs["trial_id"] == "t99").sum() == 1 and (got.epochs["trial_id"] == "t99").sum() == 3
    assert [(c.read, c.trials) for c in results.compact(tmp_path)] == [(1, 8)] * len(results.TABLES)


def test_rewritten_trial_replaces_its_compacted_rows(tmp_path):
    sweep(tmp_path)
    results.compact(tmp_path)
    time.sleep(0.01)
    results.write(record("t01", "l2w", seed=1, epochs=7, shift=0.5), tmp_path)  # resumed: more epochs, new acc
    got = results.load(tmp_path, compact=False)
    same(got, per_trial_read(tmp_path))
    assert (got.epochs["trial_id"] == "t01").sum() == 7 and (got.runs["trial_id"] == "t01").sum() == 1
    assert got.exits.loc[got.exits["trial_id"] == "t01", "top1"].tolist() == [51.5, 52.5, 53.5]
    compaction = results.compact(tmp_path)[0]
    assert (compaction.read, compaction.dropped, compaction.trials) == (1, 1, 7)
    same(results.load(tmp_path), per_trial_read(tmp_path))


def test_removed_per_trial_file_drops_its_compacted_rows(tmp_path):
    sweep(tmp_path)
    results.compact(tmp_path)
    for table in results.TABLES:
        (tmp_path / "store" / table / "t02.parquet").unlink()
    got = results.load(tmp_path)
    assert "t02" not in set(got.runs["trial_id"]) and "t02" not in set(got.epochs["trial_id"])
    same(got, per_trial_read(tmp_path))


def test_copied_store_is_still_held_by_digest_and_compaction_refreshes_it(tmp_path):
    sweep(tmp_path / "a")
    results.compact(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy)  # new inodes and mtimes
    plan = results._Plan.make(tmp_path / "b", "runs", results._Compacted.open(tmp_path / "b", "runs"))
    assert (plan.fresh, plan.stale, len(plan.moved)) == ([], [], 7)
    same(results.load(tmp_path / "b"), per_trial_read(tmp_path / "a"))
    compaction = results.compact(tmp_path / "b")[0]
    assert (compaction.written, compaction.read, compaction.trials) == (True, 0, 7)
    plan = results._Plan.make(tmp_path / "b", "runs", results._Compacted.open(tmp_path / "b", "runs"))
    assert (plan.fresh, plan.stale, plan.moved) == ([], [], {})


def test_sweep_resumed_after_compaction_is_read_completely(tmp_path):
    """A sweep killed midway (one trial finished, one part-way, one failed), compacted at the end of its first
    run; resumed: the part-way and failed trials rewrite their files, new trials write theirs."""
    results.write(record("a", epochs=4), tmp_path)
    results.write(record("b", "l2w", seed=1, status="stopped", epochs=2), tmp_path)
    results.write(record("c", "distill", seed=2, status="failed", epochs=1), tmp_path)
    results.compact(tmp_path)  # what the end of `exitbench sweep` does
    time.sleep(0.01)
    results.write(record("b", "l2w", seed=1, epochs=4, shift=1.0), tmp_path)
    results.write(record("c", "distill", seed=2, epochs=4, shift=2.0), tmp_path)
    results.write(record("d", seed=3, epochs=4), tmp_path)
    got = results.load(tmp_path, compact=False)
    same(got, per_trial_read(tmp_path))
    assert got.runs.set_index("trial_id")["status"].to_dict() == {t: "finished" for t in "abcd"}
    assert got.epochs.groupby("trial_id").size().to_dict() == {t: 4 for t in "abcd"}
    assert got.exits.groupby("trial_id").size().to_dict() == {t: 3 for t in "abcd"}
    results.compact(tmp_path)
    same(results.load(tmp_path), per_trial_read(tmp_path))


KILLED_COMPACTION = """
import sys, time
import pyarrow.parquet as pq
from bench import results

def stall(table, where, **kwargs):  # write part of the file, then hang until killed
    where.write(b"PAR1" + b"x" * 1000)
    where.flush()
    print("writing", flush=True)
    time.sleep(60)

pq.write_table = stall
results.compact(sys.argv[1], ["epochs"])
"""


@pytest.mark.slow
def test_killed_compaction_leaves_a_readable_store(tmp_path):
    sweep(tmp_path)
    results.compact(tmp_path)
    results.write(record("t50", seed=1), tmp_path)
    before = (tmp_path / "store" / "compacted" / "epochs.parquet").read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_COMPACTION, str(tmp_path)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(results.__file__).parents[1])})
    try:
        assert proc.stdout.readline() == b"writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    temps = list((tmp_path / "store" / "compacted").glob(".epochs.parquet.*.tmp"))
    assert len(temps) == 1  # killed mid-write: its half file is there, under a name readers ignore
    assert (tmp_path / "store" / "compacted" / "epochs.parquet").read_bytes() == before
    same(results.load(tmp_path, compact=False), per_trial_read(tmp_path))
    os.utime(temps[0], (time.time() - 2 * results.STALE_TMP_S,) * 2)
    assert results.compact(tmp_path)[results.TABLES.index("epochs")].read == 1
    assert not temps[0].exists()  # the next compaction removed the old leftover
    same(results.load(tmp_path), per_trial_read(tmp_path))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no manifest"])
def test_corrupt_compacted_file_is_one_clear_error_and_compact_rebuilds_it(tmp_path, damage, run_cli):
    sweep(tmp_path)
    results.compact(tmp_path)
    path = tmp_path / "store" / "compacted" / "budgets.parquet"
    if damage == "garbage":
        path.write_bytes(b"not a parquet file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        pd.DataFrame({"trial_id": ["t00"]}).to_parquet(path)
    with pytest.raises(results.CorruptStore) as err:
        results.load(tmp_path)
    message = str(err.value)
    assert str(path) in message and f"exitbench store compact --rebuild {tmp_path}" in message and "\n" not in message
    code, out, stderr = run_cli("report", tmp_path, "--out", tmp_path / "report")
    assert code == 2 and stderr.count("\n") == 1 and str(path) in stderr and "Traceback" not in stderr
    assert not (tmp_path / "report").exists()
    code, out, stderr = run_cli("store", "compact", tmp_path)  # a footer it cannot read: rebuilt even so
    assert code == 0 and "budgets: 7 trials (7 per-trial files read" in out and "rebuilt" in out
    same(results.load(tmp_path), per_trial_read(tmp_path))


def test_damaged_data_page_is_the_same_clear_error(tmp_path):
    sweep(tmp_path)
    results.compact(tmp_path)
    path = tmp_path / "store" / "compacted" / "exits.parquet"
    data = bytearray(path.read_bytes())
    data[4:200] = b"\xff" * 196  # the first column chunk; the footer stays readable
    path.write_bytes(bytes(data))
    with pytest.raises(results.CorruptStore, match="exitbench store compact --rebuild"):
        results.load(tmp_path)
    exits = results.TABLES.index("exits")
    assert not results.compact(tmp_path)[exits].written  # the footer looks fine: only --rebuild reads every page
    assert results.compact(tmp_path, rebuild=True)[exits].read == 7
    same(results.load(tmp_path), per_trial_read(tmp_path))


def test_projection_and_filters_are_pushed_down(tmp_path):
    sweep(tmp_path)
    results.compact(tmp_path)
    results.write(record("t98", "l2w", seed=0), tmp_path)  # one trial only in its per-trial files
    # epochs is neither asked for nor read: breaking both of its sources changes nothing
    (tmp_path / "store" / "compacted" / "epochs.parquet").write_bytes(b"broken")
    shutil.rmtree(tmp_path / "store" / "epochs")
    got = results.load(tmp_path, ["runs", "exits", "budgets"], columns={"exits": ["top1"], "runs": ["seed"]},
                       filters={"runs": [("config.data.name", "==", "digits")], "budgets": pc.field("p") == 2})
    everything = results.load(tmp_path, ["runs", "exits", "budgets"])
    digits = set(everything.runs.loc[everything.runs["config.data.name"] == "digits", "trial_id"])
    assert set(got.runs["trial_id"]) == digits and "t98" in digits and len(digits) == 6
    assert list(got.runs.columns) == ["trial_id", "seed"] and list(got.exits.columns) == ["trial_id", "top1"]
    want = everything.exits[everything.exits["trial_id"].isin(digits)].reset_index(drop=True)[["trial_id", "top1"]]
    assert got.exits.equals(want)
    assert set(got.budgets["p"]) == {2} and set(got.budgets["trial_id"]) == digits - {"t04"}  # t04 failed
    assert got.epochs.empty


def test_bad_queries_are_usage_errors(tmp_path, run_cli):
    sweep(tmp_path)
    results.compact(tmp_path)
    with pytest.raises(UsageError, match="'latencies': not a results table"):
        results.load(tmp_path, ["latencies"])
    with pytest.raises(UsageError, match="no column 'top9' in the exits table"):
        results.load(tmp_path, columns={"exits": ["top9"]})
    with pytest.raises(UsageError, match="filters\\['exits'\\]"):
        results.load(tmp_path, filters={"exits": [("top9", ">", 1)]})
    code, out, err = run_cli("store", "compact", tmp_path / "nowhere")
    assert code == 2 and "no results store" in err and err.count("\n") == 1


def test_load_compacts_when_many_files_are_new(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "AUTO_COMPACT", 5)
    sweep(tmp_path, n=3)
    results.load(tmp_path)
    assert not (tmp_path / "store" / "compacted").exists()  # 4 new files per table: read as they are
    sweep(tmp_path)
    got = results.load(tmp_path, ["exits"])
    assert sorted(p.name for p in (tmp_path / "store" / "compacted").iterdir()) == ["exits.parquet"]
    assert got.exits.equals(per_trial_read(tmp_path)["exits"])


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "--trials: expected an integer >= 1, got '0'"),
    (["--lrs", "many"], "--lrs: expected an integer >= 1, got 'many'"),
    (["--dir", __file__], "--dir " + __file__ + ": not a folder"),
])
def test_store_scale_bad_arguments(args, message):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "store_scale.py"
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr


def test_readme_store_example_runs(tmp_path, monkeypatch):
    page = (Path(__file__).resolve().parents[1] / "docs" / "sweeps.md").read_text()  # the results store's section
    (block,) = [b for b in re.findall(r"```py\n(.*?)```", page, flags=re.S) if "results.load(" in b]
    sweep(tmp_path / "runs" / "default")
    results.write(record("t97", "l2w", seed=0), tmp_path / "runs" / "default")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "docs/sweeps.md-store", "exec"), scope)
    t = scope["t"]
    assert set(t.exits["trial_id"]) == set(t.budgets["trial_id"]) == {"t01", "t97"} and t.epochs.empty
    assert list(t.budgets.columns) == ["trial_id", "p", "test_acc", "expected_macs"]


def test_unreadable_per_trial_file_is_one_clear_error(tmp_path):
    sweep(tmp_path)
    (tmp_path / "store" / "exits" / "t03.parquet").write_bytes(b"junk")
    with pytest.raises(UsageError, match="per-trial results file .*t03.parquet is unreadable"):
        results.load(tmp_path)


def test_quiet_table_folders_spare_the_per_file_checks_until_a_write(tmp_path, monkeypatch):
    sweep(tmp_path)
    results.compact(tmp_path)  # folders just written: nothing to vouch for yet
    assert results._Compacted.open(tmp_path, "runs").dir_mtime_ns is None
    past = time.time() - 60
    for table in results.TABLES:
        os.utime(tmp_path / "store" / table, (past, past))
    assert [c.written and c.read == 0 for c in results.compact(tmp_path)] == [True] * len(results.TABLES)  # now it can
    scans = []
    monkeypatch.setattr(results, "_trial_files", lambda d, scan=results._trial_files: scans.append(d) or scan(d))
    same(results.load(tmp_path, compact=False), per_trial_read(tmp_path))
    assert scans == []
    results.write(record("t01", "l2w", seed=1, epochs=5, shift=3.0), tmp_path)  # a rename moves each folder's mtime
    got = results.load(tmp_path, compact=False)
    assert len(scans) == len(results.TABLES) and (got.epochs["trial_id"] == "t01").sum() == 5
    same(got, per_trial_read(tmp_path))
    shutil.rmtree(tmp_path / "store" / "budgets")  # a vanished folder holds no trials
    assert results.load(tmp_path, ["budgets"]).budgets.empty


def test_settled_compaction_vouches_for_folders_just_written(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "QUIET_DIR_S", 0.3)
    sweep(tmp_path)
    results.compact(tmp_path, settle=True)  # as at the end of a sweep: waits for the folders to be quiet
    assert all(results._Compacted.open(tmp_path, t).dir_mtime_ns for t in results.TABLES)
    same(results.load(tmp_path), per_trial_read(tmp_path))


def test_unreadable_compacted_file_with_no_per_trial_files_left_is_removed(tmp_path):
    sweep(tmp_path)
    results.compact(tmp_path)
    shutil.rmtree(tmp_path / "store" / "epochs")
    (tmp_path / "store" / "compacted" / "epochs.parquet").write_bytes(b"junk")
    epochs = results.compact(tmp_path)[results.TABLES.index("epochs")]
    assert epochs.rebuilt and epochs.trials == 0
    assert not (tmp_path / "store" / "compacted" / "epochs.parquet").exists()
    assert results.load(tmp_path).epochs.empty
