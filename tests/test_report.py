"""The report on hand-made results stores whose numbers are known in closed form.

Exits at 1, 2 and 4 MMACs. Per seed s = 0, 1, 2 (budget points as (MMACs, top-1)):
  uniform:          exits 50, 60, 79+s; budgets (1.5, 60+s), (2, 50) [dominated], (2.5, 70+s), (4, 80+s)
  l2w epsilon=0.5:  exits 52, 62, 81+s; budgets (1.5, 62+2s), (2.5, 75+2s), (3.5, 85+2s)
plus an l2w epsilon=1 trial (seed 0), a failed l2w trial, and a distill trial calibrated on the test split.
"""

import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.errors import UsageError
from bench.evaluate.curves import Curves
from bench.report import build, figures, frame, stats, tables
from bench.results import ResultRecord, load, write

M = 1e6
T975 = {2: 4.302652729911275, 3: 3.182446305284263, 4: 2.7764451051977987}  # Student t 97.5 %, by d.o.f.
T975_2DF = T975[2]
ROOT = Path(__file__).resolve().parent.parent


def record(tid, method, seed, top1, budgets, *, status="finished", error=None, calibration="heldout",
           epochs=10, test_size=None, **method_params):
    macs = [1 * M, 2 * M, 4 * M]
    config = {"name": "t", "data": {"name": "synthetic", "val_size": 100},
              "backbone": {"name": "tiny", "widths": [4, 8, 16]}, "method": {"name": method, **method_params},
              "optim": {"lr": 0.1}, "epochs": epochs, "seed": seed, "out_dir": f"runs/{tid}"}
    if status == "failed":
        return ResultRecord(trial_id=tid, status="failed", error=error, config=config, seed=seed)
    return ResultRecord(
        trial_id=tid, config=config, seed=seed, counter="fvcore 0.1.5", calibration=calibration,
        versions={"torch": "2.0", "torch_threads": "1"}, git_commit="abc",
        data_info={"test_size": test_size} if test_size else {},
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
    files = build.build_report(sweep)
    return sweep / "report", files


def ci(sd, n):
    return T975[n - 1] * sd / math.sqrt(n)


def logit_ci(values, n_test=10_000):
    """The 95 % logit-t interval, computed here by hand: t-interval of the mean logit, mapped back."""
    p = [min(max(v / 100, 0.5 / n_test), 1 - 0.5 / n_test) for v in values]
    logits = [math.log(q / (1 - q)) for q in p]
    mean = sum(logits) / len(logits)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logits) / (len(logits) - 1))
    half = ci(sd, len(logits))
    return tuple(100 / (1 + math.exp(-x)) for x in (mean - half, mean + half))


# ------------------------------------------------------------------------------------------- curves

def test_curve_envelope_interpolation_and_inverse():
    c = Curves.envelopes(["a"] * 5 + ["b"] * 2, [2, 1, 3, 3, 4, 5, 1], [50, 60, 55, 70, 65, 10, 20])
    macs, acc = c.points("a")
    assert macs.tolist() == [1, 3] and acc.tolist() == [60, 70]  # (2,50), (3,55), (4,65) are dominated
    assert c.points("b")[0].tolist() == [1] and c.points("b")[1].tolist() == [20]  # (5, 10) is dominated
    a = c.take(["a"])
    assert np.isnan(a.at([0.5])[0]) and a.at([2])[0] == pytest.approx(65) and a.at([10])[0] == 70
    assert a.at(np.array([[0.5, 2, 10]])).shape == (1, 3)
    assert a.macs_to_reach([60])[0] == 1 and a.macs_to_reach([65])[0] == pytest.approx(2)
    assert math.isnan(a.macs_to_reach([71])[0])
    assert a.mean_over([1], [5])[0] == pytest.approx((65 * 2 + 70 * 2) / 4)
    both = c.take(["a", "b"])
    assert both.top().tolist() == [70, 20] and both.at([2, 2]).tolist() == [pytest.approx(65), 20]


def test_per_trial_metrics_are_recomputed(sweep):
    tables, _ = frame.load_runs([str(sweep)])
    metrics, _ = frame.trial_metrics(tables)
    m = metrics.set_index("trial_id")
    assert "l2w-e0.5-s3" not in m.index  # failed: no metrics, listed elsewhere
    u = m.loc["uniform-s1"]
    assert u["last_acc"] == 80 and u["best_acc"] == 81 and u["acc_at_25"] == 50 and u["best_at"] == 100
    assert u["acc_at_50"] == pytest.approx(66) and u["acc_at_75"] == pytest.approx(70 + 1 + 10 / 3)
    assert u["acc_at_100"] == pytest.approx(81)
    # Trapezoids over [1, 4] M: (50, 61) on [1, 1.5], (61, 71) on [1.5, 2.5], (71, 81) on [2.5, 4].
    assert u["auc"] == pytest.approx((55.5 * 0.5 + 66 * 1 + 76 * 1.5) / 3)
    l2 = m.loc["l2w-e0.5-s2"]
    assert l2["acc_at_50"] == pytest.approx(72.5) and l2["acc_at_75"] == pytest.approx(84) and l2["best_acc"] == 89
    assert l2["best_at"] == pytest.approx(100 * 3.5 / 4)  # reached at the 3.5 M budget, before the last exit


def _best_is_the_top_of_its_curve(store_dir):
    tables, _ = frame.load_runs([str(store_dir)])
    metrics, _ = frame.trial_metrics(tables)
    m = metrics.set_index("trial_id")
    points = pd.concat([tables.budgets[["trial_id", "test_acc"]].rename(columns={"test_acc": "acc"}),
                        tables.exits[["trial_id", "top1"]].rename(columns={"top1": "acc"})])
    highest = points.groupby("trial_id")["acc"].max().reindex(m.index)
    assert (m["best_acc"] >= tables.budgets.groupby("trial_id")["test_acc"].max().reindex(m.index)).all()
    assert (m["best_acc"] == highest).all()  # every budget and every exit alone lies on or under it
    for f in frame.FRACTIONS:
        assert (m["best_acc"] >= m[f"acc_at_{f}"] - 1e-9).all()
    assert np.allclose(m["best_acc"], m["acc_at_100"])  # same curve: nothing costs more than the last exit
    assert ((m["best_at"] > 0) & (m["best_at"] <= 100 + 1e-9)).all()


def test_best_is_at_least_every_point_of_its_own_curve(sweep):
    _best_is_the_top_of_its_curve(sweep)
    _best_is_the_top_of_its_curve(ROOT / "results" / "default")  # a real sweep's store


# ------------------------------------------------------------------------------------------ intervals

def test_groups_means_and_logit_t_intervals(built):
    out, _ = built
    table = pd.read_csv(out / "table.csv")
    u = table[table["method"] == "uniform"].iloc[0]
    assert u["seeds"] == 3 and u["failed"] == 0 and u["variant"] != u["variant"]  # NaN: no varied field
    assert u["acc_at_50_mean"] == pytest.approx(66) and u["acc_at_50_std"] == pytest.approx(1)
    lo, hi = logit_ci([65, 66, 67])
    assert (u["acc_at_50_lo"], u["acc_at_50_hi"]) == (pytest.approx(lo, rel=1e-5), pytest.approx(hi, rel=1e-5))
    assert u["last_acc_mean"] == pytest.approx(80) and u["exit1_top1_mean"] == 50 and u["exit1_top1_std"] == 0
    assert u["exit1_top1_lo"] == pytest.approx(50) and u["exit1_top1_hi"] == pytest.approx(50)  # no spread
    assert u["auc_mean"] == pytest.approx(np.mean([(205 + 2.75 * s) / 3 for s in range(3)]), rel=1e-5)
    l2 = table[(table["method"] == "l2w") & (table["variant"] == "epsilon=0.5")].iloc[0]
    assert l2["seeds"] == 3 and l2["failed"] == 1  # the failed seed is counted, not dropped
    assert l2["best_acc_mean"] == pytest.approx(87) and l2["best_acc_std"] == pytest.approx(2)
    assert l2["best_acc_lo"] == pytest.approx(logit_ci([85, 87, 89])[0], rel=1e-5)
    assert l2["best_at_mean"] == pytest.approx(87.5)
    one = table[(table["method"] == "l2w") & (table["variant"] == "epsilon=1")].iloc[0]
    assert one["seeds"] == 1 and np.isnan(one["best_acc_std"]) and np.isnan(one["best_acc_lo"])
    assert table.loc[table["method"] == "distill", "calibration"].item() == "test"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 100), st.sampled_from([0.0, 100.0, 99.9, 0.1])), min_size=1, max_size=8),
       st.integers(1, 100_000))
def test_an_interval_never_leaves_0_100(values, n_test):
    mean, lo, hi, n = stats.logit_t(np.array(values), n_test)
    assert n == len(values) and 0 <= mean <= 100
    if n < 3:
        assert np.isnan(lo) and np.isnan(hi)  # too few seeds: no interval at all
    else:
        assert 0 <= lo <= hi <= 100


def test_intervals_near_the_bounds_and_too_few_seeds(tmp_path):
    """What the issue saw: a near-ceiling group whose t-interval passed 100, a 2-seed group spanning below 0."""
    for s, (last, budget) in enumerate([(99.5, 99.9), (100.0, 100.0), (97.0, 99.0)]):
        write(record(f"hi{s}", "uniform", s, [50, 90, last], [(1.5, 80), (3, budget)], test_size=449), tmp_path)
    for s, last in enumerate([2.0, 30.0]):
        write(record(f"lo{s}", "l2w", s, [1, 1, last], [(3, last)], test_size=449), tmp_path)
    build.build_report(tmp_path, plots=False)
    table = pd.read_csv(tmp_path / "report" / "table.csv")
    lows, highs = table.filter(like="_lo").to_numpy(), table.filter(like="_hi").to_numpy()
    assert np.nanmin(lows) >= 0 and np.nanmax(highs) <= 100
    u = table[table["method"] == "uniform"].iloc[0]
    assert u["last_acc_hi"] < 100 and u["last_acc_lo"] == pytest.approx(logit_ci([99.5, 100, 97], 449)[0], rel=1e-5)
    two = table[table["method"] == "l2w"].iloc[0]
    assert two["last_acc_n"] == 2 and np.isnan(two["last_acc_lo"]) and np.isnan(two["last_acc_hi"])
    board = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "95 % logit-t CI" in board and "n = 2 < 3: no CI" in board and "], n = 3 |" in board


# ------------------------------------------------------------------------------------------ figures

def test_band_on_a_common_grid_only_where_every_seed_has_a_point():
    # Three seeds; seed c's cheapest point is 1.5 M (its exit 1 is missing), b's last exit is at 3 M.
    c = Curves.envelopes(["a", "a", "a", "b", "b", "b", "c", "c"],
                         [1, 2, 4, 1, 2, 3, 1.5, 4], [50, 70, 90, 40, 80, 85, 60, 95])
    grid = np.array([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    mean, lo, hi, complete = figures.curve_band(c, [4, 3, 4], grid)
    assert complete.tolist() == [False, False, True, True, True, True, False, False]
    assert np.isnan(mean[~complete]).all() and np.isnan(lo[~complete]).all()  # no band, no jumping mean there
    a = [50 + 20 * (x - 1) if x <= 2 else 70 + 10 * (x - 2) for x in grid]
    b = [40 + 40 * (x - 1) if x <= 2 else 80 + 5 * (x - 2) for x in grid]
    cc = [60 + 35 / 2.5 * (x - 1.5) for x in grid]
    for i in np.flatnonzero(complete):
        values = [a[i], b[i], cc[i]]
        assert mean[i] == pytest.approx(sum(values) / 3)
        assert (lo[i], hi[i]) == (pytest.approx(logit_ci(values)[0]), pytest.approx(logit_ci(values)[1]))
        assert 0 <= lo[i] <= mean[i] <= hi[i] <= 100
    two = figures.curve_band(c.take(["a", "b"]), [4, 3], grid)
    assert np.isfinite(two[0][2]) and np.isnan(two[1]).all()  # n = 2: a mean line, no band


def test_figure_legends_name_the_interval_and_mark_fewer_seeds(built, sweep):
    tables, _ = frame.load_runs([str(sweep)])
    metrics, _ = frame.trial_metrics(tables)
    agg = frame.aggregate(tables.runs, metrics, tables.exits)
    done = tables.runs[tables.runs["status"] == "finished"].assign(display=lambda d: d["label"])
    texts = [s[3] for s in figures.plot_series(done, agg, figures.method_palette(done["label"]))]
    assert "l2w (epsilon=0.5) · n = 3 (+1 failed)" in texts
    assert "l2w (epsilon=1) · n = 1 of 3: no CI (n < 3)" in texts and "uniform · n = 3" in texts
    out, files = built
    for stem in ("anytime", "budgeted", "differences", "exit_fractions"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG" and (out / f"{stem}.pdf").stat().st_size > 1000


def test_many_methods_are_told_apart_by_colour_and_line_style():
    """Past the palette's ten colours, a repeated colour comes with other line styles and a bar hatch: of 20
    methods with two variants each, no two lines share colour and style, and no two methods' bars colour and
    hatch."""
    names = [f"m{i:02d}" for i in range(20)]
    palette = figures.method_palette(reversed(names))
    lines = [(palette[m], figures.method_line_style(palette, m, j)) for m in names for j in range(2)]
    assert len(set(lines)) == len(lines)
    assert len({(palette[m], figures.method_hatch(palette, m)) for m in names}) == len(names)
    assert len({palette[m] for m in names}) == figures.PALETTE_SIZE
    assert figures.method_line_style(palette, "m00", 0) == "-" and figures.method_hatch(palette, "m00") is None
    assert figures.method_line_style(palette, "m10", 0) == ":" and figures.method_hatch(palette, "m10") == "//"


def test_paired_difference_band_along_the_budget():
    # Pairs (m_i, u_i); budgets as % of each pair's baseline last-exit MACs (4 M, then 2 M).
    mine = Curves.envelopes(["m1", "m1", "m2", "m2", "m3", "m3"], [1, 4, 0.5, 2, 1, 4],
                            [60, 90, 50, 80, 62, 88])
    base = Curves.envelopes(["u1", "u1", "u2", "u2", "u3", "u3"], [1, 4, 1, 2, 2, 4],
                            [50, 80, 40, 70, 60, 85])
    pct = np.array([10.0, 25.0, 50.0, 100.0])
    mean, lo, hi, complete = figures.difference_band(mine, base, [4, 2, 4], pct)

    def line(x, x0, y0, x1, y1):
        return np.nan if x < x0 else y0 + (min(x, x1) - x0) / (x1 - x0) * (y1 - y0)

    for k, p in enumerate(pct):
        q = [p / 100 * 4, p / 100 * 2, p / 100 * 4]
        d = [line(q[0], 1, 60, 4, 90) - line(q[0], 1, 50, 4, 80),
             line(q[1], 0.5, 50, 2, 80) - line(q[1], 1, 40, 2, 70),
             line(q[2], 1, 62, 4, 88) - line(q[2], 2, 60, 4, 85)]
        if np.isnan(d).any():  # u3 starts at 2 M: nothing below 50 %
            assert not complete[k] and np.isnan(mean[k]) and np.isnan(lo[k])
            continue
        assert complete[k] and mean[k] == pytest.approx(np.mean(d))
        assert (lo[k], hi[k]) == (pytest.approx(np.mean(d) - ci(np.std(d, ddof=1), 3)),
                                  pytest.approx(np.mean(d) + ci(np.std(d, ddof=1), 3)))
    assert complete.tolist() == [False, False, True, True]
    two = figures.difference_band(mine.take(["m1", "m2"]), base.take(["u1", "u2"]), [4, 2], pct)
    assert np.isfinite(two[0][3]) and np.isnan(two[1]).all()  # 2 pairs: a mean, no interval


# ------------------------------------------------------------------------------------------ comparisons

def test_paired_differences_and_speedup(built):
    out, _ = built
    comp = pd.read_csv(out / "comparison.csv")
    r = comp[(comp["method"] == "l2w") & (comp["variant"] == "epsilon=0.5")].iloc[0]
    assert r["pairs"] == 3 and r["baseline"] == "uniform"
    # Differences per seed s: @25 % 2; @50 % 3.5+s; @75 % 6.667+s; @100 % 5+s; best 5+s.
    assert r["d_acc_at_25_mean"] == pytest.approx(2) and r["d_acc_at_25_std"] == pytest.approx(0)
    assert r["d_acc_at_50_mean"] == pytest.approx(4.5)
    assert r["d_acc_at_50_lo"] == pytest.approx(4.5 - ci(1, 3), rel=1e-5)
    assert r["d_acc_at_50_hi"] == pytest.approx(4.5 + ci(1, 3), rel=1e-5)
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
    one = comp[comp["variant"] == "epsilon=1"].iloc[0]
    assert one["pairs"] == 1 and np.isnan(one["d_auc_lo"]) and np.isnan(one["p_t"])  # seed 0 only: no CI, no t
    assert one["p_signflip"] == 1.0  # one pair: both sign vectors are as extreme


def test_speedup_at_a_stated_accuracy(sweep, tmp_path):
    build.build_report(sweep, tmp_path, baseline="uniform", speedup_acc=75, plots=False)
    r = pd.read_csv(tmp_path / "comparison.csv").query("variant == 'epsilon=0.5'").iloc[0]
    # uniform reaches 75 at 2.5 + 1.5 * (5-s)/10 M; l2w at 1.5 + (13-2s)/13 M (s=0: exactly 2.5).
    u = [2.5 + 1.5 * (5 - s) / 10 for s in range(3)]
    m = [1.5 + (13 - 2 * s) / 13 for s in range(3)]
    assert r["speedup"] == pytest.approx(np.exp(np.mean(np.log(np.array(u) / np.array(m)))), rel=1e-5)


LAST = {  # last-exit top-1 per group and seed 0..4 (the ablation store); the tests use them by hand
    ("uniform", None): [90.0, 91.5, 89.0, 92.0, 90.5],
    ("uniform", "[1, 2, 4]"): [91.0, 92.5, 90.5, 92.0, 92.0],
    ("l2w", None): [92.5, 93.0, 91.0, 94.5, 92.0],
    ("distill", None): [89.0, 92.0, 88.5, 93.5, 90.0],
}


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """uniform, uniform with exit_weights, l2w and distill, five seeds each, and ge with two seeds."""
    root = tmp_path_factory.mktemp("ablation")
    for (method, weights), lasts in LAST.items():
        for s, last in enumerate(lasts):
            params = {"exit_weights": [1, 2, 4]} if weights else {}
            write(record(f"{method}-{weights or 'plain'}-s{s}", method, s, [50, 70, last],
                         [(1.5, 65 + s), (3, last - 1)], **params), root)
    for s in range(2):
        write(record(f"ge-s{s}", "ge", s, [50, 70, 90 + s], [(1.5, 65), (3, 89)]), root)
    return root


@pytest.mark.slow  # imports every registered method (torch) to know uniform's defaults
def test_every_group_is_paired_with_the_baseline_default_variant(ablation, tmp_path):
    build.build_report(ablation, tmp_path, metric="last_acc", plots=False)
    comp = pd.read_csv(tmp_path / "comparison.csv", dtype={"variant": str}).fillna({"variant": ""})
    assert set(comp["baseline"]) == {"uniform"}
    rows = {(r["method"], r["variant"]): r for _, r in comp.iterrows()}
    assert set(rows) == {("uniform", "exit_weights=[1, 2, 4]"), ("l2w", ""), ("distill", ""), ("ge", "")}
    variant = rows[("uniform", "exit_weights=[1, 2, 4]")]  # the ablation a user adding a weighting wants
    d = np.subtract(LAST[("uniform", "[1, 2, 4]")], LAST[("uniform", None)])
    assert variant["pairs"] == 5 and variant["d_last_acc_mean"] == pytest.approx(d.mean())
    assert variant["d_last_acc_lo"] == pytest.approx(d.mean() - ci(d.std(ddof=1), 5))
    md = (tmp_path / "table.md").read_text()
    assert "### Against uniform (paired by seed)" in md and "| uniform (exit_weights=[1, 2, 4]) | 5 |" in md
    # A variant named as the tables print it becomes the baseline; plain uniform is then compared with it.
    build.build_report(ablation, tmp_path / "v", baseline="uniform (exit_weights=[1, 2, 4])", metric="last_acc",
                       plots=False)
    comp = pd.read_csv(tmp_path / "v" / "comparison.csv", dtype={"variant": str}).fillna({"variant": ""})
    assert set(comp["baseline"]) == {"uniform (exit_weights=[1, 2, 4])"}
    plain = comp[(comp["method"] == "uniform") & (comp["variant"] == "")].iloc[0]
    assert plain["d_last_acc_mean"] == pytest.approx(-d.mean())


def test_paired_tests_with_holm_correction(ablation, tmp_path):
    from scipy.stats import ttest_rel

    build.build_report(ablation, tmp_path, metric="last_acc", plots=False)
    comp = pd.read_csv(tmp_path / "comparison.csv", dtype={"variant": str}).fillna({"variant": ""})
    base = np.array(LAST[("uniform", None)])
    expected = {}
    for (method, weights), lasts in LAST.items():
        if (method, weights) == ("uniform", None):
            continue
        d = np.array(lasts) - base
        flips = [abs(sum(s * x for s, x in zip(signs, d))) for signs in itertools.product([1, -1], repeat=5)]
        p_flip = sum(f >= abs(d.sum()) - 1e-9 for f in flips) / 32
        variant = "exit_weights=[1, 2, 4]" if weights else ""
        expected[(method, variant)] = (ttest_rel(lasts, base).pvalue, p_flip)
    ge = np.array([90.0, 91.0]) - base[:2]
    expected[("ge", "")] = (ttest_rel([90.0, 91.0], base[:2]).pvalue, 1 / 4 * sum(
        abs(a * ge[0] + b * ge[1]) >= abs(ge.sum()) - 1e-9 for a, b in itertools.product([1, -1], repeat=2)))

    def holm_by_hand(ps: dict) -> dict:
        order = sorted(ps, key=ps.get)
        out, running = {}, 0.0
        for i, key in enumerate(order):
            running = max(running, min(1.0, (len(order) - i) * ps[key]))
            out[key] = running
        return out

    for which, column in ((0, "p_t"), (1, "p_signflip")):
        raw = {k: v[which] for k, v in expected.items()}
        adjusted = holm_by_hand(raw)
        for _, r in comp.iterrows():
            key = (r["method"], r["variant"])
            assert r[column] == pytest.approx(raw[key], rel=1e-5), (column, key)
            assert r[f"{column}_holm"] == pytest.approx(adjusted[key], rel=1e-5), (column, key)
    assert (comp["test_metric"] == "last_acc").all()
    board = (tmp_path / "leaderboard.md").read_text()
    assert "p t (Holm)" in board and "p sign-flip (Holm)" in board and "| baseline |" in board
    l2w = comp[comp["method"] == "l2w"].iloc[0]
    assert f"{l2w['p_t']:.3g} ({l2w['p_t_holm']:.3g})" in board
    # The significance column: Holm-adjusted paired t p < 0.05, with the direction of the mean difference.
    adjusted_t = holm_by_hand({k: v[0] for k, v in expected.items()})
    for _, r in comp.iterrows():
        key = (r["method"], r["variant"])
        d = np.mean(np.array(LAST[(key[0], "[1, 2, 4]" if key[1] else None)] if key[0] != "ge" else [90.0, 91.0])
                    - (base if key[0] != "ge" else base[:2]))
        want = "no" if adjusted_t[key] >= 0.05 else ("yes: higher" if d > 0 else "yes: lower")
        line = next(x for x in board.splitlines() if x.startswith("| ") and f" | {r['label']} | " in x)
        assert line.rstrip(" |").endswith(want), (key, line)
    assert "significant (α = 0.05)" in board


def test_significance_reads_the_holm_adjusted_p():
    assert tables.significance(1.2, 0.01) == "yes: higher" and tables.significance(-0.3, 0.049) == "yes: lower"
    assert tables.significance(2.0, 0.05) == "no" and tables.significance(1.0, float("nan")) == "—"


def test_holm_and_sign_flip_by_hand():
    # Sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1 = 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.2.
    assert np.allclose(stats.holm([0.01, 0.04, 0.03, 0.2, np.nan]), [0.04, 0.09, 0.09, 0.2, np.nan], equal_nan=True)
    assert stats.holm([0.5, 0.9]).tolist() == [1.0, 1.0]
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == 2 / 8  # only all + and all - reach |6|
    assert stats.sign_flip_p([1.0, -1.0]) == 1.0
    assert stats.paired_t_p([0.0, 0.0, 0.0]) == 1.0


# ------------------------------------------------------------------------------------------ text

def test_markdown_tex_leaderboard_and_figures(built):
    out, files = built
    md = (out / "table.md").read_text()
    assert "## synthetic · tiny" in md and "| uniform | 3 | 80.00 ± 1.00 |" in md
    assert "best = acc@100 %" in md and "| 81.00 ± 1.00 | 100.0 ± 0.0 |" in md  # uniform: best at the last exit
    assert "l2w (epsilon=0.5) | 3 (+1 failed)" in md
    lo, hi = logit_ci([79, 80, 81])  # uniform's last exit over its 3 seeds
    ci_table = md.split("95 % logit-t CI of the means above (n ≥ 3 seeds):")[1].split("Anytime")[0]
    row = next(line for line in ci_table.splitlines() if line.startswith("| uniform |"))
    assert row.startswith(f"| uniform | 3 | [{lo:.2f}, {hi:.2f}] |")
    assert "| l2w (epsilon=1) | 1 | — | — |" in ci_table  # one seed: no interval
    assert "l2w-e0.5-s3" in md and "TrainingDiverged: loss is nan at epoch 2" in md  # failed trial listed
    assert "distill †" in md
    assert "† exit thresholds calibrated not on a held-out split but on the test split itself" in md
    assert "×1.38 [1.27, 1.50]" in md  # geometric-mean speed-up of l2w over uniform
    assert "95 % logit-t CI" in md and "Produced by: torch 2.0; torch threads per trial: 1; git abc." in md
    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$80.00 \pm 1.00$" in tex and r"$^\dagger$" in tex
    board = (out / "leaderboard.md").read_text()
    rows = [line for line in board.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == ["l2w (epsilon=0.5)", "l2w (epsilon=1)", "distill †", "uniform"]
    assert "| 95 % logit-t CI |" in board and "Produced by:" in board
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_default_baseline_absent_is_a_note(tmp_path, run_cli, monkeypatch):
    for s in range(2):
        write(l2w(s), tmp_path)
    write(l2w(1).model_copy(update={"trial_id": "l2w-repeat"}), tmp_path)
    write(record("d0", "distill", 0, None, None, status="failed", error=None), tmp_path)
    monkeypatch.setattr(build, "figures", lambda *a, **k: [])  # drawn in the fixture already; saves seconds
    code, out, err = run_cli("report", tmp_path, "--metric", "best_acc")
    assert code == 0, err
    md = (tmp_path / "report" / "table.md").read_text()
    assert "The default baseline 'uniform' is not in this sweep (methods: distill, l2w)" in md
    assert "Ranked by best" in (tmp_path / "report" / "leaderboard.md").read_text()
    assert "| distill | 0 (+1 failed) | — |" in md and "(no error recorded)" in md  # all seeds failed: still listed
    assert "Note: repeated seeds in l2w: several finished trials share a seed" in md


def test_repeated_seeds_pair_one_to_one(tmp_path):
    """Trials sharing a seed pair in trial-id order, not as every combination (which grows quadratically)."""
    for k in range(3):
        for s in range(2):
            write(uniform(s).model_copy(update={"trial_id": f"u{k}-s{s}"}), tmp_path)
            write(l2w(s).model_copy(update={"trial_id": f"l{k}-s{s}"}), tmp_path)
    build.build_report(tmp_path, plots=False)
    comp = pd.read_csv(tmp_path / "report" / "comparison.csv")
    assert comp["pairs"].tolist() == [6]


def test_leaderboard_merges_sweeps(sweep, tmp_path, run_cli):
    other = tmp_path / "longer"
    for s in range(2):
        write(record(f"u{s}", "uniform", s, [55, 65, 90], [(1.5, 70), (4, 90 + s)], epochs=30), other)
    code, out, err = run_cli("leaderboard", sweep, other, "--out", tmp_path / "board", "--metric", "best_acc")
    assert code == 0, err
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    first = next(line for line in board.splitlines() if line.startswith("| 1 |"))
    assert "uniform (epochs=30)" in first and "90.50 ± 0.71" in first and "longer" in first
    assert "n = 2 < 3: no CI" in first
    assert "uniform (epochs=10)" in board  # epochs now varies, so it names the groups
    assert (tmp_path / "board" / "leaderboard.csv").is_file()
    l2w_row = next(line for line in board.splitlines() if "l2w (epochs=10, epsilon=0.5)" in line)
    assert "p t (Holm)" in board and ", n = 3 |" in l2w_row  # paired with uniform at the same epochs


@pytest.mark.parametrize("sweep_name", ["default", "fashion-mnist"])
def test_committed_results_rebuild_from_their_store(tmp_path, sweep_name):
    """results/<sweep> holds the sweep's store: the committed tables are exactly what it gives."""
    committed = ROOT / "results" / sweep_name
    shutil.copytree(committed / "store", tmp_path / sweep_name / "store")  # the report never writes next to it
    build.build_report(tmp_path / sweep_name, tmp_path / "out", baseline="uniform", plots=False)
    for name in ("table.md", "table.csv", "table.tex", "comparison.csv", "failed.csv", "leaderboard.md"):
        assert (tmp_path / "out" / name).read_text() == (committed / name).read_text(), name
    assert "torch threads per trial:" in (committed / "table.md").read_text()


def test_committed_leaderboard_rebuilds_with_its_published_rows(tmp_path):
    """results/leaderboard.md is `make results-leaderboard`: both committed sweeps and the published rows."""
    for name in ("fashion-mnist", "default"):
        shutil.copytree(ROOT / "results" / name / "store", tmp_path / name / "store")
    build.build_leaderboard([str(tmp_path / "fashion-mnist"), str(tmp_path / "default")], tmp_path / "out",
                            published=[str(ROOT / "results" / "published")])
    committed = (ROOT / "results" / "leaderboard.md").read_text()
    assert (tmp_path / "out" / "leaderboard.md").read_text() == committed
    assert "## Published results (not run here)" in committed and "LeapLabTHU/L2W-DEN README" in committed


def test_copy_store_makes_the_report_rebuildable(sweep, tmp_path):
    out = tmp_path / "published"
    (out / "store" / "runs").mkdir(parents=True)
    (out / "store" / "runs" / "old-trial.parquet").write_text("from an earlier sweep")  # replaced, not merged
    written = build.build_report(sweep, out, plots=False, copy_store=True)
    assert out / "store" in written and not (out / "store" / "records").exists()
    assert not (out / "store" / "runs" / "old-trial.parquet").exists()
    first = (out / "table.md").read_text()
    build.build_report(out, tmp_path / "again", plots=False)
    again = (tmp_path / "again" / "table.md").read_text()
    assert again.split("\n", 1)[1] == first.split("\n", 1)[1]  # the title: no sweep name recorded, the folder's
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_readme_shows_the_committed_default_table():
    """The README's default-result table is the committed table.md's (regenerate both together)."""
    table = (ROOT / "results" / "default" / "table.md").read_text()
    main = table[table.index("| method | seeds |"):].split("\n\n")[0]
    assert main in (ROOT / "README.md").read_text(), \
        "README.md's default-result table differs from results/default/table.md: copy the table over"


@pytest.mark.parametrize("args, message", [
    (["report", "{tmp}/nope"], "does not exist"),
    (["report", "{tmp}/file"], "sweep folder '{tmp}/file' is a file, not a folder"),  # it said 'does not exist'
    (["report", "{tmp}/empty"], "holds no trials"),
    (["report", "{tmp}/plain"], "no results store"),
    (["report", "{sweep}", "--metric", "speed"], "unknown --metric 'speed'; valid: auc"),
    (["report", "{sweep}", "--baseline", "msdnet"], "--baseline 'msdnet' is not in this sweep (methods: distill"),
    (["report", "{sweep}", "--baseline", "l2w"],
     "--baseline 'l2w' has no variant with the method's default parameters (l2w (epsilon=0.5); l2w (epsilon=1))"),
    (["report", "{sweep}", "--out", "{tmp}/file"], "is a file"),
    (["leaderboard", "{sweep}", "{tmp}/nope", "--out", "{tmp}/b"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(sweep, tmp_path, run_cli, args, message):
    (tmp_path / "empty" / "store" / "runs").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli(*[a.format(tmp=tmp_path, sweep=sweep) for a in args])
    assert code == 2 and message.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b").exists()


def test_baseline_variant_named_with_whole_numbers(tmp_path):
    """Real runs store exit_weights as floats, so tables print '[1.0, 2.0, 4.0]'; the README's and --help's
    'uniform (exit_weights=[1, 2, 4])' must still name that variant (it said 'is not in this sweep')."""
    for s in range(3):
        write(record(f"u-s{s}", "uniform", s, [50, 70, 90 + s], [(1.5, 65), (3, 89)]), tmp_path)
        write(record(f"w-s{s}", "uniform", s, [50, 70, 88 + s], [(1.5, 66), (3, 87)],
                     exit_weights=[1.0, 2.0, 4.0]), tmp_path)
    runs = frame.annotate(load(tmp_path)).runs
    spelt = "uniform (exit_weights=[1.0, 2.0, 4.0])"
    assert spelt in set(runs["label"])
    for name in (spelt, "uniform (exit_weights=[1, 2, 4])", "uniform (exit_weights=[1, 2.0, 4])"):
        baseline, note = frame.resolve_baseline(runs, name)
        assert note is None and baseline.label == spelt and baseline.trial_ids == {"w-s0", "w-s1", "w-s2"}
    with pytest.raises(UsageError, match="is not in this sweep"):
        frame.resolve_baseline(runs, "uniform (exit_weights=[1, 2, 5])")
