"""The report on a hand-made results store whose numbers are known in closed form.

Exits at 1, 2 and 4 MMACs. Per seed s = 0, 1, 2 (budget points as (MMACs, top-1)):
  uniform:          exits 50, 60, 79+s; budgets (1.5, 60+s), (2, 50) [dominated], (2.5, 70+s), (4, 80+s)
  l2w epsilon=0.5:  exits 52, 62, 81+s; budgets (1.5, 62+2s), (2.5, 75+2s), (3.5, 85+2s)
plus an l2w epsilon=1 trial (seed 0), a failed l2w trial, and a distill trial calibrated on the test split.
"""

import math

import numpy as np
import pandas as pd
import pytest

from bench import report
from bench.results import ResultRecord, write

M = 1e6
T975_2DF = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (printed tables)


def record(tid, method, seed, top1, budgets, *, status="finished", error=None, calibration="heldout",
           epochs=10, **method_params):
    macs = [1 * M, 2 * M, 4 * M]
    config = {"name": "t", "data": {"name": "synthetic", "val_size": 100},
              "backbone": {"name": "tiny", "widths": [4, 8, 16]}, "method": {"name": method, **method_params},
              "optim": {"lr": 0.1}, "epochs": epochs, "seed": seed, "out_dir": f"runs/{tid}"}
    if status == "failed":
        return ResultRecord(trial_id=tid, status="failed", error=error, config=config, seed=seed)
    return ResultRecord(
        trial_id=tid, config=config, seed=seed, counter="fvcore 0.1.5", calibration=calibration,
        exits=[{"exit": k + 1, "top1": a, "top5": 100.0, "macs": m, "params": 1000 * (k + 1)}
               for k, (a, m) in enumerate(zip(top1, macs))],
        budgets=[{"p": p + 1, "test_acc": a, "val_acc": a, "expected_macs": m * M,
                  "exit_fractions": [0.5 - 0.1 * p, 0.3, 0.2 + 0.1 * p], "thresholds": [0.9, None, None]}
                 for p, (m, a) in enumerate(budgets)],
        summary={"auc": 0.0})  # deliberately wrong: the report recomputes from the rows


def uniform(s):
    return record(f"uniform-s{s}", "uniform", s, [50, 60, 79 + s], [(1.5, 60 + s), (2, 50), (2.5, 70 + s), (4, 80 + s)])


def l2w(s, epsilon=0.5):
    return record(f"l2w-e{epsilon}-s{s}", "l2w", s, [52, 62, 81 + s],
                  [(1.5, 62 + 2 * s), (2.5, 75 + 2 * s), (3.5, 85 + 2 * s)], epsilon=epsilon)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for s in range(3):
        write(uniform(s), root)
        write(l2w(s), root)
    write(l2w(0, epsilon=1.0), root)
    write(record("l2w-e0.5-s3", "l2w", 3, None, None, status="failed", epsilon=0.5,
                 error="Traceback (most recent call last):\n  ...\nTrainingDiverged: loss is nan at epoch 2"), root)
    write(record("distill-s0", "distill", 0, [51, 61, 80], [(1.5, 61), (3, 79)], calibration="test"), root)
    return root


@pytest.fixture(scope="module")
def built(sweep):
    files = report.build_report(sweep)
    return sweep / "report", files


def ci(sd, n):
    return T975_2DF * sd / math.sqrt(n)


def test_curve_envelope_interpolation_and_inverse():
    c = report.Curve.envelope([2, 1, 3, 3, 4], [50, 60, 55, 70, 65])
    assert c.macs.tolist() == [1, 3] and c.acc.tolist() == [60, 70]  # (2,50), (3,55), (4,65) are dominated
    assert np.isnan(c.at(0.5)) and c.at(2) == pytest.approx(65) and c.at(10) == 70
    assert c.macs_to_reach(60) == 1 and c.macs_to_reach(65) == pytest.approx(2) and math.isnan(c.macs_to_reach(71))
    assert c.mean_over(1, 5) == pytest.approx((65 * 2 + 70 * 2) / 4)


def test_per_trial_metrics_are_recomputed(sweep):
    tables, _ = report.load_runs([str(sweep)])
    metrics, _ = report.trial_metrics(tables)
    m = metrics.set_index("trial_id")
    assert "l2w-e0.5-s3" not in m.index  # failed: no metrics, listed elsewhere
    u = m.loc["uniform-s1"]
    assert u["last_acc"] == 80 and u["best_acc"] == 81 and u["acc_at_25"] == 50
    assert u["acc_at_50"] == pytest.approx(66) and u["acc_at_75"] == pytest.approx(70 + 1 + 10 / 3)
    assert u["acc_at_100"] == pytest.approx(81)
    # Trapezoids over [1, 4] M: (50, 61) on [1, 1.5], (61, 71) on [1.5, 2.5], (71, 81) on [2.5, 4].
    assert u["auc"] == pytest.approx((55.5 * 0.5 + 66 * 1 + 76 * 1.5) / 3)
    l2 = m.loc["l2w-e0.5-s2"]
    assert l2["acc_at_50"] == pytest.approx(72.5) and l2["acc_at_75"] == pytest.approx(84) and l2["best_acc"] == 89


def test_groups_means_and_t_intervals(built):
    out, _ = built
    table = pd.read_csv(out / "table.csv")
    u = table[table["method"] == "uniform"].iloc[0]
    assert u["seeds"] == 3 and u["failed"] == 0 and u["variant"] != u["variant"]  # NaN: no varied field
    assert u["acc_at_50_mean"] == pytest.approx(66) and u["acc_at_50_std"] == pytest.approx(1)
    assert u["acc_at_50_ci"] == pytest.approx(ci(1, 3), rel=1e-5)
    assert u["last_acc_mean"] == pytest.approx(80) and u["exit1_top1_mean"] == 50 and u["exit1_top1_std"] == 0
    assert u["auc_mean"] == pytest.approx(np.mean([(205 + 2.75 * s) / 3 for s in range(3)]), rel=1e-5)
    l2 = table[(table["method"] == "l2w") & (table["variant"] == "epsilon=0.5")].iloc[0]
    assert l2["seeds"] == 3 and l2["failed"] == 1  # the failed seed is counted, not dropped
    assert l2["best_acc_mean"] == pytest.approx(87) and l2["best_acc_std"] == pytest.approx(2)
    assert l2["best_acc_ci"] == pytest.approx(ci(2, 3), rel=1e-5)
    one = table[(table["method"] == "l2w") & (table["variant"] == "epsilon=1")].iloc[0]
    assert one["seeds"] == 1 and np.isnan(one["best_acc_std"]) and np.isnan(one["best_acc_ci"])
    assert table.loc[table["method"] == "distill", "calibration"].item() == "test"


def test_paired_differences_and_speedup(built):
    out, _ = built
    comp = pd.read_csv(out / "comparison.csv")
    r = comp[(comp["method"] == "l2w") & (comp["variant"] == "epsilon=0.5")].iloc[0]
    assert r["pairs"] == 3 and r["baseline"] == "uniform"
    # Differences per seed s: @25 % 2; @50 % 3.5+s; @75 % 6.667+s; @100 % 5+s; best 5+s.
    assert r["d_acc_at_25_mean"] == pytest.approx(2) and r["d_acc_at_25_std"] == pytest.approx(0)
    assert r["d_acc_at_50_mean"] == pytest.approx(4.5) and r["d_acc_at_50_ci"] == pytest.approx(ci(1, 3), rel=1e-5)
    assert r["d_acc_at_75_mean"] == pytest.approx(20 / 3 + 1, rel=1e-5)
    assert r["d_acc_at_100_mean"] == pytest.approx(6) and r["d_best_acc_mean"] == pytest.approx(6)
    # uniform needs 4 M to reach its best (80+s); l2w needs 2.5 + (5-s)/10 M.
    ratios = np.array([4 / (2.5 + (5 - s) / 10) for s in range(3)])
    logs = np.log(ratios)
    assert r["speedup"] == pytest.approx(np.exp(logs.mean()), rel=1e-5)
    half = ci(logs.std(ddof=1), 3)
    assert r["speedup_lo"] == pytest.approx(np.exp(logs.mean() - half), rel=1e-5)
    assert r["speedup_hi"] == pytest.approx(np.exp(logs.mean() + half), rel=1e-5)
    assert r["speedup_n"] == 3 and r["speedup_target"] == pytest.approx(81)
    assert comp.loc[comp["variant"] == "epsilon=1", "pairs"].item() == 1  # seed 0 only


def test_speedup_at_a_stated_accuracy(sweep, tmp_path):
    report.build_report(sweep, tmp_path, baseline="uniform", speedup_acc=75, plots=False)
    r = pd.read_csv(tmp_path / "comparison.csv").query("variant == 'epsilon=0.5'").iloc[0]
    # uniform reaches 75 at 2.5 + 1.5 * (5-s)/10 M; l2w at 1.5 + (13-2s)/13 M (s=0: exactly 2.5).
    u = [2.5 + 1.5 * (5 - s) / 10 for s in range(3)]
    m = [1.5 + (13 - 2 * s) / 13 for s in range(3)]
    assert r["speedup"] == pytest.approx(np.exp(np.mean(np.log(np.array(u) / np.array(m)))), rel=1e-5)


def test_markdown_tex_leaderboard_and_figures(built):
    out, files = built
    names = {p.name for p in files}
    for stem in ("anytime", "budgeted", "exit_fractions"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG" and (out / f"{stem}.pdf").stat().st_size > 1000
    md = (out / "table.md").read_text()
    assert "## synthetic · tiny" in md and "| uniform | 3 | 80.00 ± 1.00 |" in md
    assert "l2w (epsilon=0.5) | 3 (+1 failed)" in md
    assert "l2w-e0.5-s3" in md and "TrainingDiverged: loss is nan at epoch 2" in md  # failed trial listed
    assert "distill †" in md
    assert "† exit thresholds calibrated not on a held-out split but on the test split itself" in md
    assert "×1.38 [1.27, 1.50]" in md  # geometric-mean speed-up of l2w over uniform
    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$80.00 \pm 1.00$" in tex and r"$^\dagger$" in tex
    board = (out / "leaderboard.md").read_text()
    rows = [line for line in board.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == ["l2w (epsilon=0.5)", "l2w (epsilon=1)", "distill †", "uniform"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_default_baseline_absent_is_a_note(tmp_path, run_cli, monkeypatch):
    for s in range(2):
        write(l2w(s), tmp_path)
    write(l2w(1).model_copy(update={"trial_id": "l2w-repeat"}), tmp_path)
    write(record("d0", "distill", 0, None, None, status="failed", error=None), tmp_path)
    monkeypatch.setattr(report, "figures", lambda *a, **k: [])  # drawn in the fixture already; saves seconds
    code, out, err = run_cli("report", tmp_path, "--metric", "best_acc")
    assert code == 0, err
    md = (tmp_path / "report" / "table.md").read_text()
    assert "The default baseline 'uniform' is not in this sweep" in md
    assert "Ranked by best" in (tmp_path / "report" / "leaderboard.md").read_text()
    assert "| distill | 0 (+1 failed) | — |" in md and "(no error recorded)" in md  # all seeds failed: still listed
    assert "Note: repeated seeds in l2w: several finished trials share a seed" in md


def test_leaderboard_merges_sweeps(sweep, tmp_path, run_cli):
    other = tmp_path / "longer"
    for s in range(2):
        write(record(f"u{s}", "uniform", s, [55, 65, 90], [(1.5, 70), (4, 90 + s)], epochs=30), other)
    code, out, err = run_cli("leaderboard", sweep, other, "--out", tmp_path / "board", "--metric", "best_acc")
    assert code == 0, err
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    first = next(line for line in board.splitlines() if line.startswith("| 1 |"))
    assert "uniform (epochs=30)" in first and "90.50 ± 0.71" in first and "longer" in first
    assert "uniform (epochs=10)" in board  # epochs now varies, so it names the groups
    assert (tmp_path / "board" / "leaderboard.csv").is_file()


@pytest.mark.parametrize("args, message", [
    (["report", "{tmp}/nope"], "does not exist"),
    (["report", "{tmp}/empty"], "holds no trials"),
    (["report", "{tmp}/plain"], "no results store"),
    (["report", "{sweep}", "--metric", "speed"], "unknown --metric 'speed'; valid: auc"),
    (["report", "{sweep}", "--baseline", "msdnet"], "--baseline 'msdnet' is not a method of this sweep"),
    (["report", "{sweep}", "--out", "{tmp}/file"], "is a file"),
    (["leaderboard", "{sweep}", "{tmp}/nope", "--out", "{tmp}/b"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(sweep, tmp_path, run_cli, args, message):
    (tmp_path / "empty" / "store" / "runs").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli(*[a.format(tmp=tmp_path, sweep=sweep) for a in args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b").exists()
