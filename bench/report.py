"""Comparison tables, leaderboards and figures from a sweep's results store (`exitbench report`, `leaderboard`).

Every number is recomputed from the store's long tables (bench.results), not taken from trial summaries:

- Budgeted curve of a trial: the monotone upper envelope of its operating points -- each budget's
  (expected MACs, test top-1) and each exit run alone for every sample (cumulative MACs, anytime top-1) --
  with linear interpolation between envelope points (routing a random share of samples through either of two
  operating points reaches any point on the segment between them), flat beyond the dearest point (spare
  budget is simply not spent) and undefined below the cheapest one (no model can spend less than exit 1).
- acc@X %: that curve at X % of the trial's last-exit MACs. AUC: the curve's mean over [exit-1 MACs,
  last-exit MACs] (a normalised area, in % top-1). best: the top of the same curve, and `best at` the fewest
  MACs (in % of the last exit's) that reach it. No operating point costs more than the last exit, so
  acc@100 % equals best by construction: tables show them as one column.
- Trials are grouped by (dataset, backbone, method, varied hyper-parameters: config fields that take more than
  one value within some dataset x backbone x method, seed/name/out_dir aside) and summarised over seeds by
  mean, sample std and, for n >= 3 seeds, the 95 % logit-t interval of the mean: the Student-t interval of
  the mean of logit(accuracy), mapped back to %. It stays inside (0, 100) and is asymmetric near the bounds,
  where accuracies pile up; far from them it is the usual t-interval. A t-interval on the % scale leaves the
  range (clipping it only hides that its model is wrong there), and a bootstrap percentile interval over 3
  seeds cannot reach beyond the observed values and covers far less than 95 %. An accuracy of exactly 0 or
  100 % enters the logit half a test sample inside the range. With fewer than 3 seeds no interval is given.
- Against a baseline -- a method's default variant (its registered default parameters), or a variant named
  as the tables print it -- every other group, the baseline's own variants included, is paired by seed
  (same dataset, backbone and non-method settings; repeated seeds matched in trial-id order): the
  difference of the two curves at common MACs with its paired t-interval (n >= 3), the speed-up at equal
  accuracy (the MACs the baseline needs to reach an accuracy over the MACs the method needs; geometric mean,
  t-interval on the log ratio), and, on the ranking metric, a paired t-test and an exact sign-flip
  permutation test, their p-values Holm-corrected over the comparisons of one report.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench import results
from bench.errors import UsageError, check_output_dir

FRACTIONS = (25, 50, 75, 100)  # budgets as % of the last exit's MACs
METRICS = {
    "auc": "AUC",
    "best_acc": "best",
    "last_acc": "last exit",
    **{f"acc_at_{f}": f"acc@{f} %" for f in FRACTIONS},
}
KEYS = ["dataset", "backbone", "method", "variant"]
NOT_HYPERPARAMS = {"config.seed", "config.name", "config.out_dir", "config.progress",
                   "config.data.name", "config.backbone.name", "config.method.name"}
DAGGER = "†"
MIN_SEEDS_FOR_CI = 3
ALPHA = 0.05  # family-wise level of the leaderboard's significance column (Holm over its comparisons)
CI_KIND = "95 % logit-t CI"  # how every table and figure names the interval of a mean accuracy
DIFF_CI_KIND = "95 % paired t CI"  # the interval of a mean paired difference
DEFAULT_TEST_SIZE = 10_000  # for the logit of an exact 0 / 100 % when the store does not record the test size
EXACT_SIGN_FLIPS = 16  # enumerate all 2^n sign vectors up to this many pairs; sample beyond


# ----------------------------------------------------------------------------------------------- curves

@dataclass
class Curves:
    """Budgeted curves of many trials as padded envelope arrays: row i holds the envelope of trial ids[i] in
    columns 0..count[i]-1 (MACs increasing, accuracy strictly increasing), then MACs inf and accuracy NaN.
    Every operation works on all rows at once, so a report's cost grows linearly with its trials."""

    ids: pd.Index
    macs: np.ndarray  # [N, P]
    acc: np.ndarray  # [N, P]
    count: np.ndarray  # [N]

    @classmethod
    def envelopes(cls, trial_ids, macs, acc, ids=None) -> Curves:
        """Envelopes of long-form operating points (trial id, MACs, accuracy), one row per id of `ids`."""
        trial_ids = np.asarray(trial_ids, dtype=object)
        ids = pd.Index(pd.unique(trial_ids) if ids is None else ids, name="trial_id")
        code = pd.Categorical(trial_ids, categories=ids).codes.astype(np.int64)
        macs, acc = np.asarray(macs, float), np.asarray(acc, float)
        ok = np.isfinite(macs) & np.isfinite(acc) & (code >= 0)
        code, macs, acc = code[ok], macs[ok], acc[ok]
        order = np.lexsort((-acc, macs, code))  # per trial by MACs; at equal MACs the best accuracy first
        code, macs, acc = code[order], macs[order], acc[order]
        running = pd.Series(acc).groupby(code).cummax().to_numpy()
        first = np.r_[True, code[1:] != code[:-1]] if code.size else np.zeros(0, bool)
        best_before = np.where(first, -np.inf, np.r_[-np.inf, running[:-1]])
        keep = acc > best_before  # a point survives only if it beats every cheaper one of its trial
        code, macs, acc = code[keep], macs[keep], acc[keep]
        count = np.bincount(code, minlength=len(ids))
        position = np.arange(code.size) - np.r_[0, np.cumsum(count)[:-1]][code]
        width = max(int(count.max(initial=0)), 1)
        out_macs, out_acc = np.full((len(ids), width), np.inf), np.full((len(ids), width), np.nan)
        out_macs[code, position], out_acc[code, position] = macs, acc
        return cls(ids, out_macs, out_acc, count)

    def take(self, trial_ids) -> Curves:
        rows = self.ids.get_indexer(pd.Index(trial_ids))
        if (rows < 0).any():
            raise KeyError(f"no curve for trial {list(pd.Index(trial_ids)[rows < 0])[:3]}")
        return Curves(self.ids[rows], self.macs[rows], self.acc[rows], self.count[rows])

    def points(self, trial_id) -> tuple[np.ndarray, np.ndarray]:
        """One trial's envelope points (MACs, accuracy)."""
        i = self.ids.get_loc(trial_id)
        return self.macs[i, : self.count[i]], self.acc[i, : self.count[i]]

    def _take(self, values: np.ndarray, idx: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        return np.take_along_axis(values[rows], idx, axis=1)

    def at(self, q) -> np.ndarray:
        """Accuracy reachable with q MACs, row by row (q: [N] or [N, G]); NaN below the cheapest point."""
        q = np.asarray(q, float)
        grid = q.reshape(len(self.ids), -1)
        out = np.full(grid.shape, np.nan)
        last = self.count - 1
        chunk = max(1, 4_000_000 // max(1, grid.shape[1] * self.macs.shape[1]))  # bounds the [n, G, P] temporary
        for lo in range(0, len(grid), chunk):
            rows = slice(lo, lo + chunk)
            qq = grid[rows]
            i = (self.macs[rows][:, None, :] <= qq[:, :, None]).sum(-1) - 1  # last envelope point at or below q
            i0 = np.clip(i, 0, None)
            i1 = np.clip(np.minimum(i + 1, last[rows][:, None]), 0, None)
            x0, x1 = self._take(self.macs, i0, rows), self._take(self.macs, i1, rows)
            y0, y1 = self._take(self.acc, i0, rows), self._take(self.acc, i1, rows)
            with np.errstate(invalid="ignore", divide="ignore"):
                share = np.where(x1 > x0, (qq - x0) / (x1 - x0), 0.0)
            out[rows] = np.where(i < 0, np.nan, y0 + share * (y1 - y0))
        return out.reshape(q.shape)

    def top(self) -> np.ndarray:
        """The highest accuracy of each curve (its last envelope point)."""
        i = np.clip(self.count - 1, 0, None)
        return np.where(self.count > 0, self.acc[np.arange(len(self.ids)), i], np.nan)

    def macs_to_reach(self, target) -> np.ndarray:
        """Fewest MACs at which each curve reaches its target accuracy (NaN if it never does)."""
        target = np.broadcast_to(np.asarray(target, float), (len(self.ids),))
        j = (self.acc < target[:, None]).sum(1)  # first envelope point at or above the target
        jj = np.clip(j, 0, self.macs.shape[1] - 1)[:, None]
        jp = np.clip(j - 1, 0, None)[:, None]
        m1, a1 = self._take(self.macs, jj)[:, 0], self._take(self.acc, jj)[:, 0]
        m0, a0 = self._take(self.macs, jp)[:, 0], self._take(self.acc, jp)[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(j == 0, m1, m0 + (target - a0) / (a1 - a0) * (m1 - m0))
        return np.where(np.isfinite(target) & (j < self.count), value, np.nan)

    def mean_over(self, lo, hi) -> np.ndarray:
        """Mean accuracy of each curve over [lo, hi] MACs (exact for the piecewise-linear curve)."""
        lo, hi = (np.broadcast_to(np.asarray(v, float), (len(self.ids),))[:, None] for v in (lo, hi))
        xs = np.concatenate([lo, np.clip(self.macs, lo, hi), hi], axis=1)  # padding (inf) collapses onto hi
        ys = self.at(xs)
        area = np.sum((ys[:, 1:] + ys[:, :-1]) / 2 * np.diff(xs, axis=1), axis=1)
        width = (hi - lo)[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(width > 0, area / width, self.at(lo[:, 0]))


def trial_metrics(tables: results.Tables) -> tuple[pd.DataFrame, Curves]:
    """Per finished trial: last-exit top-1 and MACs, exit-1 MACs, acc@X %, AUC, best, best at; and the curves."""
    exits = tables.exits if "exit" in tables.exits else pd.DataFrame(columns=["trial_id", "exit", "top1", "macs"])
    budgets = tables.budgets if "test_acc" in tables.budgets else pd.DataFrame(
        columns=["trial_id", "expected_macs", "test_acc"])
    ids = pd.Index(pd.unique(tables.runs.loc[tables.runs["status"] == "finished", "trial_id"]), name="trial_id")
    curves = Curves.envelopes(np.concatenate([budgets["trial_id"].to_numpy(object),
                                              exits["trial_id"].to_numpy(object)]),
                              np.concatenate([budgets["expected_macs"], exits["macs"]]),
                              np.concatenate([budgets["test_acc"], exits["top1"]]), ids)
    ex = exits[exits["trial_id"].isin(ids)].sort_values(["trial_id", "exit"])
    first = ex.drop_duplicates("trial_id", keep="first").set_index("trial_id").reindex(ids)
    last = ex.drop_duplicates("trial_id", keep="last").set_index("trial_id").reindex(ids)
    lo, hi = first["macs"].to_numpy(float), last["macs"].to_numpy(float)
    best = curves.top()
    with np.errstate(invalid="ignore", divide="ignore"):
        best_at = 100 * curves.macs_to_reach(best) / hi
    metrics = pd.DataFrame({"trial_id": ids, "last_acc": last["top1"].to_numpy(float), "last_macs": hi,
                            "first_macs": lo, "best_acc": best, "best_at": best_at, "auc": curves.mean_over(lo, hi),
                            **{f"acc_at_{f}": curves.at(f / 100 * hi) for f in FRACTIONS}})
    return metrics.reset_index(drop=True), curves


# ------------------------------------------------------------------------------------------ statistics

def t_quantile(n) -> np.ndarray:
    """The 97.5 % quantile of Student's t with n - 1 degrees of freedom (NaN for n < 2)."""
    from scipy.special import stdtrit  # inverse t CDF; scipy.stats would add a second of import time

    n = np.asarray(n, float)
    with np.errstate(invalid="ignore"):
        return np.where(n >= 2, stdtrit(np.maximum(n - 1, 1), 0.975), np.nan)


def logit_scale(acc, test_size=DEFAULT_TEST_SIZE) -> np.ndarray:
    """logit of accuracies given in %; exact 0 or 100 % moves half a test sample inside the range."""
    half = 0.5 / np.asarray(test_size, float)
    p = np.clip(np.asarray(acc, float) / 100, half, 1 - half)
    return np.log(p) - np.log1p(-p)


def logit_t_bounds(mean_logit, std_logit, n) -> tuple[np.ndarray, np.ndarray]:
    """The 95 % t-interval of the mean on the logit scale, mapped back to % (NaN below MIN_SEEDS_FOR_CI)."""
    from scipy.special import expit

    n = np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = t_quantile(n) * np.asarray(std_logit, float) / np.sqrt(n)
    ok = n >= MIN_SEEDS_FOR_CI
    return (np.where(ok, 100 * expit(mean_logit - half), np.nan), np.where(ok, 100 * expit(mean_logit + half), np.nan))


def logit_t(values, test_size=DEFAULT_TEST_SIZE, axis: int = 0):
    """Mean, 95 % logit-t interval (lo, hi) and n of accuracies (%) along `axis`, ignoring NaN."""
    v = np.asarray(values, float)
    logits = np.where(np.isfinite(v), logit_scale(np.nan_to_num(v), test_size), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty or single-value slices give NaN, as they should
        n = np.isfinite(v).sum(axis)
        lo, hi = logit_t_bounds(np.nanmean(logits, axis), np.nanstd(logits, axis, ddof=1), n)
        return np.nanmean(v, axis), lo, hi, n


def t_bounds(mean, std, n) -> tuple[np.ndarray, np.ndarray]:
    """The 95 % t-interval of a mean (of paired differences, of log ratios); NaN below MIN_SEEDS_FOR_CI."""
    n = np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(n >= MIN_SEEDS_FOR_CI, t_quantile(n) * np.asarray(std, float) / np.sqrt(n), np.nan)
    return mean - half, mean + half


def paired_t_p(diffs) -> float:
    """Two-sided p of the paired t-test (one-sample t on the differences); NaN for fewer than 2 pairs."""
    from scipy.special import stdtr

    d = np.asarray(diffs, float)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return math.nan
    mean, std = float(d.mean()), float(d.std(ddof=1))
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * stdtr(d.size - 1, -abs(mean) / (std / math.sqrt(d.size))))


def sign_flip_p(diffs, draws: int = 20_000, seed: int = 0) -> float:
    """Two-sided p of the sign-flip permutation test of zero mean difference: the share of sign vectors s whose
    |sum(s * d)| is at least the observed |sum(d)|. Exact (all 2^n vectors) for n <= EXACT_SIGN_FLIPS, else
    `draws` random vectors with the usual +1 correction. With n pairs the smallest p is 2 / 2^n."""
    d = np.asarray(diffs, float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan
    reach = abs(d.sum()) - 1e-9 * max(1.0, np.abs(d).sum())  # as extreme as observed, up to rounding
    if d.size <= EXACT_SIGN_FLIPS:
        signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
        return float((np.abs(signs @ d) >= reach).mean())
    rng, hits = np.random.default_rng(seed), 0
    for start in range(0, draws, 10_000):  # in blocks: bounded memory for many pairs
        signs = 2.0 * rng.integers(0, 2, size=(min(10_000, draws - start), d.size)) - 1
        hits += int((np.abs(signs @ d) >= reach).sum())
    return (hits + 1) / (draws + 1)


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries ignored and kept): the i-th smallest of m is
    max over j <= i of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(p, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


# ------------------------------------------------------------------------------------------------ loading

REPORT_TABLES = tuple(t for t in results.TABLES if t != "epochs")


def load_runs(sweep_dirs: list[str]) -> tuple[results.Tables, str]:
    """Load (and merge) stores; trial ids get a sweep prefix when several are merged. Returns tables, name."""
    merged: dict[str, list[pd.DataFrame]] = {t: [] for t in results.TABLES}
    names = [Path(d).name for d in sweep_dirs]
    for i, sweep_dir in enumerate(sweep_dirs):
        path = Path(sweep_dir)
        source = names[i] if names.count(names[i]) == 1 else f"{i + 1}:{names[i]}"
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise UsageError(f"sweep folder {str(sweep_dir)!r} {what}; give a sweep's folder "
                             f"(<storage_path>/<name>) or a run folder of `exitbench train`")
        tables = results.load(path, REPORT_TABLES)  # per-epoch rows (most of a store) are never reported
        if tables.runs.empty:
            raise UsageError(f"the results store of {str(sweep_dir)!r} holds no trials (nothing to report)")
        for name in results.TABLES:
            df = getattr(tables, name).copy()
            if len(sweep_dirs) > 1:
                df["trial_id"] = f"{source}/" + df["trial_id"].astype(str)
            if name == "runs":
                df["source"] = source
            merged[name].append(df)
    tables = results.Tables(**{t: pd.concat([d for d in dfs if not d.empty] or dfs, ignore_index=True)
                               for t, dfs in merged.items()})
    annotate(tables, ", ".join(sweep_dirs))
    if len(sweep_dirs) == 1:
        recorded = tables.runs["sweep"].dropna().unique() if "sweep" in tables.runs else []
        # The sweep's own name, so a report rebuilt from a copied store reads the same.
        name = str(recorded[0]) if len(recorded) == 1 else Path(sweep_dirs[0]).name
    else:
        name = ", ".join(Path(d).name for d in sweep_dirs)
    return tables, name


def annotate(tables: results.Tables, where: str = "the store") -> results.Tables:
    """Add the report's columns to the runs table: dataset, backbone, method, variant, label (in place)."""
    runs = tables.runs
    missing = [c for c in ("config.data.name", "config.backbone.name", "config.method.name", "status", "seed")
               if c not in runs]
    if missing:
        raise UsageError(f"runs table of {where} lacks {', '.join(missing)}; was it written by bench.results.write?")
    runs["dataset"] = runs["config.data.name"].astype(str)
    runs["backbone"] = runs["config.backbone.name"].astype(str)
    runs["method"] = runs["config.method.name"].astype(str)
    for col, default in (("calibration", "heldout"), ("counter", None), ("error", None), ("versions", None),
                         ("git_commit", None)):
        if col not in runs:
            runs[col] = default
    runs["calibration"] = runs["calibration"].fillna("heldout")
    varied = varied_columns(runs)
    parts = [[f"{short_name(c)}={t}" if t else "" for t in runs[c].map(_label_value)] for c in varied]
    runs["variant"] = [", ".join(p for p in row if p) for row in zip(*parts)] if varied else ""
    runs["label"] = np.where(runs["variant"] != "", runs["method"] + " (" + runs["variant"] + ")", runs["method"])
    tables.runs = runs
    return tables


def varied_columns(runs: pd.DataFrame) -> list[str]:
    """Config columns with more than one value within some dataset x backbone x method."""
    cols = [c for c in runs.columns if c.startswith("config.") and c not in NOT_HYPERPARAMS]
    if not cols:
        return []
    counts = runs.groupby(["dataset", "backbone", "method"])[cols].nunique(dropna=False)
    return [c for c in cols if (counts[c] > 1).any()]


def short_name(col: str) -> str:
    name = col.removeprefix("config.")
    return name.removeprefix("method.")


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _label_value(value) -> str:
    if _missing(value):
        return ""  # a field this method does not have
    return f"{value:g}" if isinstance(value, float) else str(value)


def _key_value(value) -> str:
    """A config value as comparable text: NaN meets None, 5 meets 5.0 (parquet widens ints next to NaN)."""
    if _missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return repr(float(value))
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))  # as bench.results.flatten stores lists
    return str(value)


def _keys(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    if not cols:
        return pd.Series("", index=df.index)
    parts = df[cols].map(_key_value)
    out = parts[cols[0]]
    for c in cols[1:]:  # column by column: a row-wise join builds a Series per row (most of a 10k report)
        out = out + "\x1f" + parts[c]
    return out


# -------------------------------------------------------------------------------------------- aggregation

def _test_sizes(runs: pd.DataFrame) -> np.ndarray:
    if "data.test_size" not in runs:
        return np.full(len(runs), float(DEFAULT_TEST_SIZE))
    sizes = pd.to_numeric(runs["data.test_size"], errors="coerce").to_numpy(float)
    return np.where(np.isfinite(sizes) & (sizes > 0), sizes, DEFAULT_TEST_SIZE)


def aggregate(runs: pd.DataFrame, metrics: pd.DataFrame, exits: pd.DataFrame) -> pd.DataFrame:
    """One row per group: seeds, failures, calibration, counter, MACs; mean/std/n and, for n >= 3, the
    95 % logit-t interval (lo, hi) of every accuracy metric; mean/std of `best at`."""
    per_trial = runs.merge(metrics, on="trial_id", how="left")
    if "exit" in exits and len(exits):
        anytime = exits.pivot_table(index="trial_id", columns="exit", values="top1")
        anytime.columns = [f"exit{int(k)}_top1" for k in anytime.columns]
        per_trial = per_trial.merge(anytime, left_on="trial_id", right_index=True, how="left")
    exit_cols = sorted((c for c in per_trial if c.startswith("exit") and c.endswith("_top1")),
                       key=lambda c: int(c[4:-5]))
    accs = [*METRICS, *exit_cols]
    done = per_trial["status"] == "finished"
    values = per_trial[[*accs, "best_at", "last_macs"]].astype(float)
    values.loc[~done] = np.nan
    logits = pd.DataFrame(np.where(np.isfinite(values[accs]), logit_scale(values[accs].fillna(50),
                                                                          _test_sizes(per_trial)[:, None]), np.nan),
                          columns=[f"logit:{m}" for m in accs], index=per_trial.index)
    work = pd.concat([per_trial[KEYS], values, logits,
                      pd.DataFrame({"_finished": done, "_failed": per_trial["status"] == "failed",
                                    "_stopped": per_trial["status"] == "stopped"})], axis=1)
    grouped = work.groupby(KEYS, sort=True, dropna=False)
    mean, std, n = grouped.mean(numeric_only=True), grouped.std(ddof=1, numeric_only=True), grouped.count()
    agg = pd.DataFrame(index=mean.index)
    agg["label"] = per_trial.groupby(KEYS, sort=True, dropna=False)["label"].first()
    agg["seeds"] = grouped["_finished"].sum().astype(int)
    agg["failed"] = grouped["_failed"].sum().astype(int)
    agg["stopped"] = grouped["_stopped"].sum().astype(int)
    finished = per_trial[done]
    agg["repeated"] = (agg["seeds"] - finished.groupby(KEYS, sort=True)["seed"].nunique()
                       .reindex(agg.index, fill_value=0)).astype(int)
    agg["calibration"] = _joined(per_trial, "calibration").reindex(agg.index)
    agg["counter"] = _joined(finished, "counter").reindex(agg.index, fill_value="")
    agg["last_macs"] = grouped["last_macs"].median()
    for m in accs:
        agg[f"{m}_mean"], agg[f"{m}_std"], agg[f"{m}_n"] = mean[m], std[m], n[m]
        agg[f"{m}_lo"], agg[f"{m}_hi"] = logit_t_bounds(mean[f"logit:{m}"], std[f"logit:{m}"], n[m])
    agg["best_at_mean"], agg["best_at_std"] = mean["best_at"], std["best_at"]
    return agg.reset_index()


def _joined(df: pd.DataFrame, col: str) -> pd.Series:
    """The sorted distinct values of `col` per group, comma-joined."""
    distinct = df[[*KEYS, col]].dropna().astype({col: str}).drop_duplicates().sort_values(col)
    return distinct.groupby(KEYS, sort=True)[col].agg(",".join)


def exit_macs(exits: pd.DataFrame, trial_ids) -> dict[int, float]:
    """Median cumulative MACs of each exit over the given trials."""
    if "exit" not in exits:
        return {}
    ex = exits[exits["trial_id"].isin(list(trial_ids))]
    return {int(k): float(v) for k, v in ex.groupby("exit")["macs"].median().items()}


# --------------------------------------------------------------------------------------------- baseline

@dataclass
class Baseline:
    """The reference of the paired comparisons: one method's trials with one set of method parameters."""

    method: str
    label: str  # as tables print it
    trial_ids: set


def _method_columns(runs: pd.DataFrame, method: str) -> list[str]:
    own = runs[runs["method"] == method]
    return [c for c in runs.columns if c.startswith("config.method.") and c != "config.method.name"
            and own[c].map(_key_value).nunique() > 1]


def _default_key(method: str, cols: list[str]) -> str | None:
    """The method's registered default parameters as the comparable text of `cols` (None if unknown)."""
    from bench.registry import METHODS, load_all

    try:
        load_all()
        params = METHODS.params(method).model_dump()
    except (UsageError, ImportError):  # a method this process cannot import: no default to go by
        return None
    flat = results.flatten({"method": {"name": method, **params}})
    return "\x1f".join(_key_value(flat.get(c.removeprefix("config."))) for c in cols)


def _numbers_as_floats(label: str) -> str:
    """A variant label with every number spelt as a float, so '[1, 2]' and '[1.0, 2.0]' compare equal."""
    return re.sub(r"(?<![\w.])-?\d+(?:\.\d*)?(?:e[-+]?\d+)?(?![\w.])", lambda m: repr(float(m.group())), label)


def resolve_baseline(runs: pd.DataFrame, requested: str | None) -> tuple[Baseline | None, str | None]:
    """The baseline named by `--baseline` (a method, meaning its default variant, or a variant as the tables
    print it, e.g. 'uniform (exit_weights=[1, 2, 3, 4])'). Without one: uniform's default variant, if any.
    Returns (baseline, None), or (None, a note for the report) when the implicit default does not apply;
    a bad explicit name is a UsageError."""
    name = requested or "uniform"
    methods, labels = sorted(runs["method"].unique()), sorted(runs["label"].unique())
    who = f"--baseline {name!r}" if requested is not None else f"the default baseline {name!r}"

    def fail(message: str):
        if requested is not None:
            raise UsageError(f"{who} {message}")
        return None, (f"{who[0].upper()}{who[1:]} {message}; pass --baseline METHOD (or a variant as the tables "
                      "name it) for paired comparisons.")

    if name not in labels and name not in methods:  # 'exit_weights=[1, 2, 4]' names the [1.0, 2.0, 4.0] variant
        same = [v for v in labels if _numbers_as_floats(v) == _numbers_as_floats(name)]
        name = same[0] if len(same) == 1 else name
    if name in labels and name not in methods:
        method = str(runs.loc[runs["label"] == name, "method"].iloc[0])
        cols = _method_columns(runs, method)
        target = _keys(runs[runs["label"] == name], cols).iloc[0]
    elif name in methods:
        method = name
        cols = _method_columns(runs, method)
        keys = _keys(runs[runs["method"] == method], cols)
        target = keys.iloc[0] if keys.nunique() == 1 else _default_key(method, cols)
        if target is None or target not in set(keys):
            variants = sorted(runs.loc[runs["method"] == method, "label"].unique())
            return fail(f"has no variant with the method's default parameters ({'; '.join(variants)}): name one")
    else:
        variants = [v for v in labels if v not in methods]
        return fail(f"is not in this sweep (methods: {', '.join(methods)}"
                    + (f"; variants: {'; '.join(variants)})" if variants else ")"))
    own = runs[runs["method"] == method]
    chosen = own[(_keys(own, cols) == target).to_numpy()]
    part = ", ".join(f"{short_name(c)}={_label_value(chosen[c].iloc[0])}" for c in cols
                     if _label_value(chosen[c].iloc[0]))  # the method's parameters only: other settings are paired
    return Baseline(method, f"{method} ({part})" if part else method, set(chosen["trial_id"])), None


# --------------------------------------------------------------------------------------------- comparison

def paired_trials(runs: pd.DataFrame, metrics: pd.DataFrame, baseline: Baseline) -> pd.DataFrame:
    """Each finished trial that is not the baseline beside the baseline trial with the same seed and shared
    settings (columns suffixed _base); empty when nothing pairs."""
    done = runs[runs["status"] == "finished"].merge(metrics, on="trial_id")
    shared = [c for c in varied_columns(runs) if not c.startswith("config.method.")]
    is_base = done["trial_id"].isin(baseline.trial_ids)
    base, others = done[is_base], done[~is_base]
    if base.empty or others.empty:
        return pd.DataFrame()
    on = ["dataset", "backbone", "_pair", "_occ"]

    def keyed(df: pd.DataFrame, group: list[str]) -> pd.DataFrame:
        df = df.sort_values("trial_id").assign(_pair=_keys(df, ["seed", *shared]))
        return df.assign(_occ=df.groupby([*group, "dataset", "backbone", "_pair"], sort=False).cumcount())

    pairs = keyed(others, KEYS).merge(keyed(base, []), on=on, suffixes=("", "_base"))
    pairs.attrs["baseline"] = baseline.label
    return pairs


def compare(runs: pd.DataFrame, metrics: pd.DataFrame, curves: Curves, baseline: Baseline,
            speedup_acc: float | None, test_metric: str = "auc") -> pd.DataFrame:
    """Every group that is not the baseline against it, paired by seed; one row per (group, baseline variant).
    The paired tests are on `test_metric`; their Holm correction runs over all rows."""
    pairs = paired_trials(runs, metrics, baseline)
    if pairs.empty:
        return pd.DataFrame()
    mine, theirs = curves.take(pairs["trial_id"]), curves.take(pairs["trial_id_base"])
    new = {}  # added at once: pairs carries every config column twice, and column-by-column inserts fragment it
    for f in FRACTIONS:  # both curves at the same MACs: f % of the baseline's last exit
        q = f / 100 * pairs["last_macs_base"].to_numpy(float)
        new[f"d_acc_at_{f}"] = mine.at(q) - theirs.at(q)
    for m in ("auc", "best_acc", "last_acc"):
        new[f"d_{m}"] = pairs[m] - pairs[f"{m}_base"]
    target = pairs["best_acc_base"].to_numpy(float) if speedup_acc is None else np.full(len(pairs), speedup_acc)
    with np.errstate(invalid="ignore", divide="ignore"):
        new["log_speedup"] = np.log(theirs.macs_to_reach(target) / mine.macs_to_reach(target))
    new["target"] = target
    new["calibration_pair"] = pairs["calibration"].astype(str) + "," + pairs["calibration_base"].astype(str)
    pairs = pd.concat([pairs[[*KEYS, "variant_base", "label"]], pd.DataFrame(new, index=pairs.index)], axis=1)
    grouped = pairs.groupby([*KEYS, "variant_base"], sort=True, dropna=False)
    cols = [f"d_{m}" for m in METRICS]
    mean, std, n = grouped[cols].mean(), grouped[cols].std(ddof=1), grouped[cols].count()
    out = pd.DataFrame(index=mean.index)
    out["label"] = grouped["label"].first()
    out["baseline"] = baseline.label
    out["pairs"] = grouped.size()
    out["calibration"] = grouped["calibration_pair"].agg(lambda s: ",".join(sorted(set(",".join(s).split(",")))))
    for c in cols:
        out[f"{c}_mean"], out[f"{c}_std"], out[f"{c}_n"] = mean[c], std[c], n[c]
        out[f"{c}_lo"], out[f"{c}_hi"] = t_bounds(mean[c], std[c], n[c])
    logs = grouped["log_speedup"]
    log_mean, log_std, log_n = logs.mean(), logs.std(ddof=1), logs.count()
    log_lo, log_hi = t_bounds(log_mean, log_std, log_n)
    out["speedup"], out["speedup_lo"], out["speedup_hi"] = np.exp(log_mean), np.exp(log_lo), np.exp(log_hi)
    out["speedup_n"], out["speedup_target"] = log_n, grouped["target"].mean()
    out["test_metric"] = test_metric
    out["p_t"] = grouped[f"d_{test_metric}"].agg(paired_t_p)
    out["p_signflip"] = grouped[f"d_{test_metric}"].agg(sign_flip_p)
    out["p_t_holm"], out["p_signflip_holm"] = holm(out["p_t"]), holm(out["p_signflip"])
    out = out.reset_index().rename(columns={"variant_base": "baseline_variant"})
    return out


# ------------------------------------------------------------------------------------------------ text

def fmt(mean: float, spread: float, digits: int = 2) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f}" if not np.isfinite(spread) else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def fmt_interval(mean: float, lo: float, hi: float, digits: int = 2, sign: bool = True) -> str:
    if not np.isfinite(mean):
        return "—"
    head = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return head if not (np.isfinite(lo) and np.isfinite(hi)) else f"{head} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_ci(lo: float, hi: float, n: int) -> str:
    """A mean's interval cell: the bounds with n, or why there are none."""
    n = int(n) if np.isfinite(n) else 0
    if n == 0:
        return "—"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"n = {n} < {MIN_SEEDS_FOR_CI}: no CI"
    return f"[{lo:.2f}, {hi:.2f}], n = {n}"


def fmt_p(p: float, adjusted: float) -> str:
    return "—" if not np.isfinite(p) else f"{p:.3g} ({adjusted:.3g})"


def macs_scale(value: float) -> tuple[str, float]:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if np.isfinite(value) and value >= scale:
            return unit, scale
    return "", 1.0


def md_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A GitHub markdown table: the first `text_columns` left-aligned, the rest (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < text_columns else "--:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def marked(row) -> str:
    return row["label"] + (f" {DAGGER}" if row["calibration"] != "heldout" else "")


def panels(df: pd.DataFrame):
    """(dataset, backbone) groups in sorted order."""
    return df.groupby(["dataset", "backbone"], sort=True) if len(df) else []


def seeds_text(r) -> str:
    """Finished seeds, and the trials of the group that failed or that the scheduler stopped early."""
    extra = [f"+{r[k]} {k}" for k in ("failed", "stopped") if r.get(k)]
    return f"{r['seeds']}" + (f" ({', '.join(extra)})" if extra else "")


MAIN_COLUMNS = ("last_acc", "acc_at_25", "acc_at_50", "acc_at_75", "best_acc", "best_at", "auc")
MAIN_HEADER = ["method", "seeds", "last exit", "acc@25 %", "acc@50 %", "acc@75 %", "best = acc@100 %",
               "best at (% MACs)", "AUC"]


def main_rows(g: pd.DataFrame) -> list[list[str]]:
    return [[marked(r), seeds_text(r), *(fmt(r[f"{m}_mean"], r[f"{m}_std"], 1 if m == "best_at" else 2)
                                         for m in MAIN_COLUMNS)]
            for _, r in g.iterrows()]


CI_COLUMNS = ("last_acc", "acc_at_25", "acc_at_50", "acc_at_75", "best_acc", "auc")
CI_HEADER = ["method", "seeds", "last exit", "acc@25 %", "acc@50 %", "acc@75 %", "best = acc@100 %", "AUC"]


def ci_rows(g: pd.DataFrame) -> list[list[str]]:
    def cell(r, m):
        lo, hi = r[f"{m}_lo"], r[f"{m}_hi"]
        return f"[{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else "—"

    return [[marked(r), seeds_text(r), *(cell(r, m) for m in CI_COLUMNS)] for _, r in g.iterrows()]


def provenance(runs: pd.DataFrame) -> str:
    """The package versions, torch thread count and commits that produced the store's finished trials."""
    done = runs[runs["status"] == "finished"]
    found: dict[str, set[str]] = {}
    for text in done["versions"].dropna().unique():
        for key, value in json.loads(text).items():
            found.setdefault(key, set()).add(str(value))
    threads = found.pop("torch_threads", None)
    packages = ", ".join(f"{k} {' / '.join(sorted(v))}" for k, v in sorted(found.items())) or "versions not recorded"
    thread_text = (f"torch threads per trial: {' / '.join(sorted(threads, key=int))}" if threads
                   else "torch thread count not recorded")
    commits = sorted(str(c)[:12] + ("-dirty" if str(c).endswith("-dirty") else "")
                     for c in done["git_commit"].dropna().unique())
    return (f"Produced by: {packages}; {thread_text}; git {', '.join(commits) or 'commit not recorded'}.")


def report_markdown(name: str, runs: pd.DataFrame, agg: pd.DataFrame, comp: pd.DataFrame, exits: pd.DataFrame,
                    baseline: Baseline | None, baseline_note: str | None, speedup_acc: float | None,
                    metric: str) -> str:
    n_failed, n_stopped = int((runs["status"] == "failed").sum()), int((runs["status"] == "stopped").sum())
    stopped = f", {n_stopped} stopped early by the scheduler" if n_stopped else ""
    out = [f"# Results: {name}", "",
           f"{len(runs)} trials: {int((runs['status'] == 'finished').sum())} finished, {n_failed} failed{stopped}. "
           "Top-1 accuracy in %, mean ± sample std over the seeds column's n seeds. acc@X %: budgeted accuracy "
           "at X % of the last exit's MACs; best: the top of the same budgeted curve, which no operating point "
           "passes at any cost (so best = acc@100 %), first reached at `best at` % of the last exit's MACs; "
           "AUC: mean budgeted accuracy from exit-1 to last-exit MACs; — : no finished trial, or a budget below "
           f"the first exit's MACs. Intervals of the means: the {CI_KIND} (Student t on logit accuracy, mapped "
           f"back, so it stays inside [0, 100]) for n ≥ {MIN_SEEDS_FOR_CI} seeds, below each table, in the "
           f"leaderboard and in `table.csv` (`*_lo`, `*_hi`); none for fewer seeds.", "", provenance(runs), ""]
    for (dataset, backbone), g in panels(agg):
        done_ids = runs.loc[(runs["dataset"] == dataset) & (runs["backbone"] == backbone)
                            & (runs["status"] == "finished"), "trial_id"]
        unit, scale = macs_scale(g["last_macs"].max())
        counter = ", ".join(sorted({c for cs in g["counter"] for c in str(cs).split(",") if c})) or "counter unknown"
        last = g["last_macs"].max()
        out += [f"## {dataset} · {backbone}", "",
                f"Last exit: {last / scale:.3g} {unit} MACs ({counter})." if np.isfinite(last)
                else "No finished trial.", "", md_table(MAIN_HEADER, main_rows(g)), ""]
        if (g["seeds"] >= MIN_SEEDS_FOR_CI).any():
            out += [f"{CI_KIND} of the means above (n ≥ {MIN_SEEDS_FOR_CI} seeds):", "",
                    md_table(CI_HEADER, ci_rows(g)), ""]
        macs = exit_macs(exits, done_ids)
        if macs:
            ks = sorted(macs)
            out += ["Anytime top-1 per exit (cumulative MACs):", "",
                    md_table(["method", *(f"exit {k} ({macs[k] / scale:.3g} {unit})" for k in ks)],
                             [[marked(r), *(fmt(r.get(f"exit{k}_top1_mean", math.nan),
                                                r.get(f"exit{k}_top1_std", math.nan)) for k in ks)]
                              for _, r in g.iterrows()]), ""]
        out += comparison_markdown(comp, dataset, backbone, baseline, baseline_note, speedup_acc, metric)
    failed = runs[runs["status"] == "failed"]
    out += ["## Failed trials", ""]
    if failed.empty:
        out += ["None.", ""]
    else:
        out += [md_table(["trial", "dataset", "backbone", "method", "seed", "error"],
                         [[r["trial_id"], r["dataset"], r["backbone"], r["label"], str(r["seed"]),
                           first_line(r["error"])] for _, r in failed.sort_values("trial_id").iterrows()],
                         text_columns=6), ""]
    return "\n".join(out + footnotes(agg))


def comparison_markdown(comp, dataset, backbone, baseline, note, speedup_acc, metric) -> list[str]:
    if note or baseline is None:
        return ["### Paired comparison", "", note or "No baseline.", ""]
    name = baseline.label
    head = [f"### Against {name} (paired by seed)", ""]
    c = comp[(comp["dataset"] == dataset) & (comp["backbone"] == backbone)] if len(comp) else comp
    if c.empty:
        return [*head, f"No finished trial of another group pairs with {name} on {dataset} · {backbone}.", ""]
    target = (f"{speedup_acc:g} % top-1" if speedup_acc is not None
              else f"{name}'s best budgeted accuracy (per seed)")
    rows = []
    for _, r in c.iterrows():
        vs = f" vs {baseline.method} ({r['baseline_variant']})" if r["baseline_variant"] else ""
        speed = ("never reached" if r["speedup_n"] == 0 else
                 "×" + fmt_interval(r["speedup"], r["speedup_lo"], r["speedup_hi"], sign=False)
                 + (f" ({r['speedup_n']}/{r['pairs']} reach it)" if r["speedup_n"] < r["pairs"] else ""))
        rows.append([marked(r) + vs, str(r["pairs"]),
                     *(fmt_interval(r[f"d_{m}_mean"], r[f"d_{m}_lo"], r[f"d_{m}_hi"])
                       for m in ("acc_at_25", "acc_at_50", "acc_at_75", "best_acc", "auc")), speed,
                     fmt_p(r["p_t"], r["p_t_holm"]), fmt_p(r["p_signflip"], r["p_signflip_holm"])])
    return [*head, f"Accuracy differences (method − {name}, points of top-1) at the same MACs, mean "
                   f"[{DIFF_CI_KIND}] over the pairs (no interval for fewer than {MIN_SEEDS_FOR_CI}); speed-up: "
                   f"{name}'s MACs over the method's MACs to reach {target}, geometric mean [95 % t CI of the "
                   f"log ratio]. p: two-sided paired t-test and exact sign-flip permutation test of Δ "
                   f"{METRICS[metric]}, with the Holm-adjusted p in brackets (over the "
                   f"{int(comp['p_t'].notna().sum())} comparisons of this report); n pairs cannot give a "
                   "sign-flip p below 2/2^n (0.25 for n = 3).",
            "", md_table(["method", "pairs", "Δ acc@25 %", "Δ acc@50 %", "Δ acc@75 %", "Δ best", "Δ AUC",
                          "speed-up", f"p t (Holm), Δ {METRICS[metric]}", f"p sign-flip (Holm), Δ {METRICS[metric]}"],
                         rows), ""]


def first_line(error) -> str:
    if _missing(error):
        return "(no error recorded)"
    lines = str(error).strip().splitlines()
    return lines[-1][:200] if lines else "(no error recorded)"


def calibration_footnote(agg: pd.DataFrame) -> str:
    why = {"test": "the test split itself (budgeted numbers are optimistic)",
           "train": "training images the model has fitted (its confidences are over-estimated)"}
    splits = sorted({s for c in agg["calibration"] for s in c.split(",") if s != "heldout"})
    return (f"{DAGGER} exit thresholds calibrated not on a held-out split but on "
            + "; or on ".join(why.get(s, f"the {s} split") for s in splits) + ": not comparable with held-out results.")


def tex_escape(text: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", DAGGER: r"$^\dagger$"}
    return "".join(table.get(ch, ch) for ch in text)


def report_latex(agg: pd.DataFrame) -> str:
    """A booktabs table of the main metrics, one block per dataset x backbone."""
    header = [tex_escape(h) for h in MAIN_HEADER]
    lines = [r"% exitbench report: top-1 (%), mean $\pm$ sample std over seeds (n = the seeds column). "
             r"Needs \usepackage{booktabs}.",
             r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", " & ".join(header) + r" \\"]
    for (dataset, backbone), g in panels(agg):
        panel = tex_escape(f"{dataset} / {backbone}")
        lines += [r"\midrule", rf"\multicolumn{{{len(header)}}}{{l}}{{\emph{{{panel}}}}} \\"]
        for row in main_rows(g):
            cells = [tex_escape(row[0]), tex_escape(row[1])]
            cells += ["--" if c == "—" else "$" + c.replace("±", r"\pm") + "$" for c in row[2:]]
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if (agg["calibration"] != "heldout").any():
        lines.append("% " + tex_escape(calibration_footnote(agg)))
    return "\n".join(lines) + "\n"


def leaderboard_markdown(agg: pd.DataFrame, metric: str, title: str, comp: pd.DataFrame | None = None,
                         baseline: Baseline | None = None, base_groups: set | None = None,
                         produced: str = "") -> str:
    out = [f"# Leaderboard: {title}", "",
           f"Ranked by {METRICS[metric]} ({metric}), mean ± sample std over seeds, and the {CI_KIND} of the mean "
           f"(Student t on logit accuracy, mapped back; inside [0, 100]) over n seeds, none for n < "
           f"{MIN_SEEDS_FOR_CI}; top-1 in %.", ""]
    paired = comp is not None and len(comp) > 0 and baseline is not None
    if paired:
        out += [f"Δ: paired difference in {METRICS[metric]} to {baseline.label} (same seed and settings), mean "
                f"[{DIFF_CI_KIND}]; p: two-sided paired t-test / exact sign-flip permutation test, Holm-adjusted "
                f"p in brackets (over the {int(comp['p_t'].notna().sum())} comparisons of this report). "
                f"Significant: Holm-adjusted paired t p < {ALPHA:g}, and in which direction (the exact sign-flip "
                f"test cannot go below 2 / 2^n, e.g. {2 / 2 ** 5:.4g} with 5 pairs).", ""]
        by_key = {tuple(r[k] for k in KEYS): r for _, r in comp.iterrows()}
    if produced:
        out += [produced, ""]
    for (dataset, backbone), g in panels(agg):
        g = g.sort_values(f"{metric}_mean", ascending=False, na_position="last", kind="stable")
        rows = []
        for rank, (_, r) in enumerate(g.iterrows(), 1):
            m = r[f"{metric}_mean"]
            row = [str(rank) if np.isfinite(m) else "–", marked(r), fmt(m, r[f"{metric}_std"]),
                   fmt_ci(r[f"{metric}_lo"], r[f"{metric}_hi"], r[f"{metric}_n"]), seeds_text(r),
                   *(fmt(r[f"{k}_mean"], r[f"{k}_std"]) for k in ("last_acc", "auc", "best_acc") if k != metric)]
            if paired:
                key = tuple(r[k] for k in KEYS)
                c = by_key.get(key)
                if base_groups and key in base_groups:
                    row += ["baseline", "", "", ""]
                elif c is None:
                    row += ["no pairs", "—", "—", "—"]
                else:
                    row += [fmt_interval(c[f"d_{metric}_mean"], c[f"d_{metric}_lo"], c[f"d_{metric}_hi"])
                            + f", n = {c[f'd_{metric}_n']}",
                            fmt_p(c["p_t"], c["p_t_holm"]), fmt_p(c["p_signflip"], c["p_signflip_holm"]),
                            significance(c[f"d_{metric}_mean"], c["p_t_holm"])]
            rows.append(row + ([r["sources"]] if "sources" in r else []))
        others = [METRICS[k] for k in ("last_acc", "auc", "best_acc") if k != metric]
        extra = [f"Δ vs {baseline.label}", "p t (Holm)", "p sign-flip (Holm)", f"significant (α = {ALPHA:g})"] \
            if paired else []
        out += [f"## {dataset} · {backbone}", "",
                md_table(["rank", "method", METRICS[metric], CI_KIND, "seeds", *others, *extra,
                          *(["sweeps"] if "sources" in g else [])], rows), ""]
    return "\n".join(out + footnotes(agg))


def significance(mean_diff: float, p_holm: float) -> str:
    """Whether a paired difference is significant after Holm's correction, and its sign."""
    if not np.isfinite(p_holm):
        return "—"
    if p_holm >= ALPHA:
        return "no"
    return "yes: higher" if mean_diff > 0 else "yes: lower"


def footnotes(agg: pd.DataFrame) -> list[str]:
    notes = []
    if (agg["calibration"] != "heldout").any():
        notes += [calibration_footnote(agg), ""]
    repeated = agg[agg["repeated"] > 0]
    if len(repeated):
        notes += [f"Note: repeated seeds in {', '.join(repeated['label'])}: several finished trials share a seed "
                  "(repeated samples or merged sweeps); each trial counts as one sample in the statistics.", ""]
    return notes


# ---------------------------------------------------------------------------------------------- figures

LINESTYLES = ("-", "--", ":", "-.")


PALETTE_SIZE = 10  # seaborn's colorblind palette


def method_palette(methods) -> dict[str, tuple]:
    """One colour per method, fixed by the sorted method names: seaborn's colorblind palette. Past ten methods
    the colours repeat, and each repeat draws its lines in other styles (`_line_style`) and its bars hatched
    (`_hatch`): evenly spaced hues (husl) grow too close to tell neighbours apart."""
    import seaborn as sns

    colours = sns.color_palette("colorblind", PALETTE_SIZE)
    return {name: colours[i % PALETTE_SIZE] for i, name in enumerate(sorted(set(methods)))}


def _repeat(palette: dict[str, tuple], method: str) -> int:
    """How many times the palette had gone round before `method`'s colour (0 for the first ten methods)."""
    return sorted(palette).index(method) // PALETTE_SIZE


def _line_style(palette: dict[str, tuple], method: str, variant: int) -> str:
    """A method's variants take the line styles in turn; a repeated colour starts two styles further on."""
    return LINESTYLES[(variant + 2 * _repeat(palette, method)) % len(LINESTYLES)]


def _hatch(palette: dict[str, tuple], method: str) -> str | None:
    return (None, "//", "..", "xx")[_repeat(palette, method) % 4]


def _axes(n_rows: int, n_cols: int = 1, width: float = 6.5, height: float = 4.0):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    return fig, axes


def _save(fig, out: Path, stem: str, note: str) -> list[Path]:
    import matplotlib.pyplot as plt

    if note:
        fig.text(0.01, -0.01, note, fontsize=8, va="top")
    written = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        # No creation date in the PDF: the same store gives byte-identical figures.
        fig.savefig(buf, format=ext, dpi=110, bbox_inches="tight",
                    metadata={"CreationDate": None} if ext == "pdf" else None)
        results.atomic_write_bytes(out / f"{stem}.{ext}", buf.getvalue())
        written.append(out / f"{stem}.{ext}")
    plt.close(fig)
    return written


def _macs_axis(g: pd.DataFrame, unit: str, what: str = "MACs") -> str:
    return f"{what} ({unit or 'count'}, {_counter_text(g)})"


def _counter_text(g: pd.DataFrame) -> str:
    return ", ".join(sorted(set(g["counter"].dropna().astype(str)))) or "counter unknown"


def _series(g: pd.DataFrame, agg: pd.DataFrame, palette: dict[str, tuple]):
    """Per (method, variant) of a panel's finished trials: trial ids, colour, line style and legend label.
    The label gives n and marks groups with fewer seeds than the panel's fullest, failed or stopped trials,
    and those with too few seeds for an interval."""
    info = agg.set_index(["method", "variant"])
    full = int(info["seeds"].max()) if len(info) else 0
    for method, by_method in g.groupby("method", sort=True):
        for j, (variant, grp) in enumerate(by_method.groupby("variant", sort=True)):
            r = info.loc[(method, variant)]
            r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
            n = int(r["seeds"])
            notes = [f"+{int(r[k])} {k}" for k in ("failed", "stopped") if r[k]]
            text = f"{grp['display'].iloc[0]} · n = {n}" + (f" of {full}" if n < full else "")
            text += f" ({', '.join(notes)})" if notes else ""
            text += f": no CI (n < {MIN_SEEDS_FOR_CI})" if n < MIN_SEEDS_FOR_CI else ""
            yield grp["trial_id"].to_numpy(), palette[method], _line_style(palette, method, j), text


def _legend(ax, ci_handle, with_ci: bool) -> None:
    handles, labels = ax.get_legend_handles_labels()
    extra = [ci_handle] if with_ci else []  # name the interval only where one is drawn
    ax.legend([*handles, *extra], [*labels, *(h.get_label() for h in extra)], loc="upper left",
              bbox_to_anchor=(1.01, 1), fontsize=8, title="mean over seeds", title_fontsize=8, frameon=False)


def figures(out: Path, runs: pd.DataFrame, tables: results.Tables, metrics: pd.DataFrame, curves: Curves,
            agg: pd.DataFrame, palette: dict[str, tuple], pairs: pd.DataFrame | None = None) -> list[Path]:
    """anytime, budgeted, differences (with `pairs`: see paired_trials) and exit_fractions figures (PNG and
    PDF), one row per dataset x backbone."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    done = runs[runs["status"] == "finished"].copy()
    if done.empty or "exit" not in tables.exits:
        return []
    # Calibration only touches the budgeted results: mark those groups there, leave the anytime figure alone.
    non_heldout = done["calibration"] != "heldout"
    done["display"] = done["label"].where(~non_heldout, done["label"] + f" {DAGGER}")
    note = f"{DAGGER} exit thresholds not calibrated on a held-out split" if non_heldout.any() else ""
    groups = list(done.groupby(["dataset", "backbone"], sort=True))
    sizes = pd.Series(_test_sizes(done), index=done["trial_id"].to_numpy())
    written: list[Path] = []
    with_ci = bool((agg["seeds"] >= MIN_SEEDS_FOR_CI).any())

    fig, axes = _axes(len(groups))
    for ax, ((dataset, backbone), g) in zip(axes[:, 0], groups):
        ex = tables.exits[tables.exits["trial_id"].isin(g["trial_id"])]
        top1 = ex.pivot_table(index="trial_id", columns="exit", values="top1")
        unit, scale = macs_scale(ex["macs"].max())
        x = ex.groupby("exit")["macs"].median().reindex(top1.columns).to_numpy() / scale
        series = list(_series(g.assign(display=g["label"]), agg, palette))
        for j, (ids, colour, style, text) in enumerate(series):
            mean, lo, hi, n = logit_t(top1.reindex(ids).to_numpy(), sizes.reindex(ids).to_numpy()[:, None])
            ax.plot(x, mean, color=colour, linestyle=style, marker="o", markersize=4, label=text)
            dodge = (j - (len(series) - 1) / 2) * 0.008 * (np.nanmax(x) - np.nanmin(x))  # bars side by side
            ax.errorbar(x + dodge, lo, yerr=[np.zeros_like(lo), hi - lo], fmt="none", ecolor=colour, elinewidth=1.3,
                        capsize=2.5)  # the bar spans [lo, hi]; NaN (n < 3): nothing drawn
        ax.set(title=f"Anytime prediction · {dataset} · {backbone}", xlabel=_macs_axis(g, unit, "cumulative MACs"),
               ylabel="top-1 accuracy (%)")
        _legend(ax, Line2D([], [], color="grey", linewidth=1.5, marker="|", markersize=10, linestyle="none",
                           label=f"bars: {CI_KIND} of the mean (n ≥ {MIN_SEEDS_FOR_CI})"), with_ci)
        _accuracy_limits(ax)
    written += _save(fig, out, "anytime", "")

    # Each trial's envelope on a common MACs grid, within its own range (exit 1 to its last exit); the mean
    # and band only where every seed of the group has a value.
    fig, axes = _axes(len(groups))
    per_trial = metrics.set_index("trial_id")
    for ax, ((dataset, backbone), g) in zip(axes[:, 0], groups):
        span = per_trial.reindex(g["trial_id"])
        lo_macs, hi_macs = span["first_macs"].min(), span["last_macs"].max()
        if not np.isfinite(lo_macs) or not np.isfinite(hi_macs):
            ax.set_axis_off()
            continue
        grid = np.linspace(lo_macs, hi_macs, 201)
        unit, scale = macs_scale(hi_macs)
        for ids, colour, style, text in _series(g, agg, palette):
            mean, lo, hi, complete = curve_band(curves.take(ids), per_trial.loc[ids, "last_macs"], grid,
                                                sizes.reindex(ids))
            ax.plot(grid / scale, mean, color=colour, linestyle=style, label=text)
            ax.fill_between(grid / scale, lo, hi, where=complete & np.isfinite(lo), color=colour, alpha=0.2,
                            linewidth=0)
        ax.set(title=f"Budgeted batch · {dataset} · {backbone}", xlabel=_macs_axis(g, unit, "expected MACs"),
               ylabel="top-1 accuracy (%)")
        _legend(ax, Patch(color="grey", alpha=0.3, label=f"shaded: {CI_KIND} of the mean (n ≥ {MIN_SEEDS_FOR_CI})"),
                with_ci)
        _accuracy_limits(ax)
    written += _save(fig, out, "budgeted", note)

    if pairs is not None and not pairs.empty:
        written += _differences_figure(out, pairs, curves, groups, palette, note)

    budgets = tables.budgets
    if "exit_fractions" in budgets and "p" in budgets and len(budgets):
        columns = ["trial_id", "method", "label"]
        written += _exit_fraction_figure(out, budgets, groups, columns, palette, note)
    return written


DIFF_GRID = np.linspace(1, 100, 199)  # budgets as % of the paired baseline trial's last-exit MACs


def difference_band(mine: Curves, theirs: Curves, last_macs_base, grid_pct):
    """Mean paired difference mine - theirs (row i with row i) at grid_pct % of each pair's baseline last-exit
    MACs, its 95 % paired t-interval, and where every pair has a value (mean and interval NaN elsewhere)."""
    q = np.asarray(grid_pct, float)[None, :] / 100 * np.asarray(last_macs_base, float)[:, None]
    d = mine.at(q) - theirs.at(q)
    complete = np.isfinite(d).all(0)
    n = d.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(complete, d.mean(0), np.nan) if n else np.full(q.shape[1], np.nan)
        std = d.std(0, ddof=1) if n > 1 else np.full(q.shape[1], np.nan)
    lo, hi = t_bounds(mean, std, n)
    return mean, lo, hi, complete


def _differences_figure(out, pairs, curves, groups, palette, note) -> list[Path]:
    """Paired differences to the baseline along the budget: for each pair (same seed and settings), the group's
    budgeted accuracy minus the baseline's at the same MACs (a share of the baseline trial's last exit), then
    the mean over pairs and its paired t-interval, drawn only where every pair has a value."""
    from matplotlib.patches import Patch

    fig, axes = _axes(len(groups))
    base_label = pairs.attrs.get("baseline", "baseline")
    for ax, ((dataset, backbone), _) in zip(axes[:, 0], groups):
        panel = pairs[(pairs["dataset"] == dataset) & (pairs["backbone"] == backbone)]
        if panel.empty:
            ax.set_axis_off()
            continue
        for method, by_method in panel.groupby("method", sort=True):
            for j, (_, grp) in enumerate(by_method.groupby(["variant", "variant_base"], sort=True)):
                mine, theirs = curves.take(grp["trial_id"]), curves.take(grp["trial_id_base"])
                mean, lo, hi, complete = difference_band(mine, theirs, grp["last_macs_base"], DIFF_GRID)
                n = len(grp)
                label = f"{grp['label'].iloc[0]} · n = {n} pairs" + (
                    f": no CI (n < {MIN_SEEDS_FOR_CI})" if n < MIN_SEEDS_FOR_CI else "")
                colour = palette[method]
                ax.plot(DIFF_GRID, mean, color=colour, linestyle=_line_style(palette, method, j), label=label)
                ax.fill_between(DIFF_GRID, lo, hi, where=complete & np.isfinite(lo), color=colour, alpha=0.15,
                                linewidth=0)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(title=f"Paired differences vs {base_label} · {dataset} · {backbone}",
               xlabel=f"budget (% of the {base_label} trial's last-exit MACs)",
               ylabel="Δ top-1 accuracy (points)")
        _legend(ax, Patch(color="grey", alpha=0.3, label=f"shaded: {DIFF_CI_KIND} (n ≥ {MIN_SEEDS_FOR_CI} pairs)"),
                True)
    return _save(fig, out, "differences", note)


def curve_band(curves: Curves, last_macs, grid, test_sizes=DEFAULT_TEST_SIZE):
    """Mean and 95 % logit-t band over seeds of the curves on a common MACs grid. Each curve counts only within
    its own range (its cheapest point to its last exit's MACs); mean and band exist only at grid points where
    every curve has a value (`complete`), so no seed dropping in or out can make the line jump."""
    grid = np.asarray(grid, float)
    values = curves.at(np.broadcast_to(grid, (len(curves.ids), grid.size)))
    values[grid[None, :] > np.asarray(last_macs, float)[:, None]] = np.nan
    complete = np.isfinite(values).all(0)
    mean, lo, hi, _ = logit_t(np.where(complete, values, np.nan), np.asarray(test_sizes, float).reshape(-1, 1))
    return mean, lo, hi, complete


def latency_figure(out: Path, runs: pd.DataFrame, latency: pd.DataFrame | None) -> list[Path]:
    """Real early-exit accuracy vs measured batch-1 median ms per image (`exitbench latency`), one line per trial
    (the budgets) with its exits alone as crosses; one panel per device. Nothing when not measured."""
    if latency is None or latency.empty or "ms_p50" not in latency:
        return []
    data = latency.merge(runs[["trial_id", "label", "seed"]], on="trial_id")
    devices = sorted(data["device"].astype(str).unique())
    fig, axes = _axes(len(devices))
    for ax, device in zip(axes[:, 0], devices):
        for (label, seed), g in data[data["device"] == device].groupby(["label", "seed"], sort=True):
            budgets = g[g["policy"] == "budget"].sort_values("p")  # in budget order: medians are noisy too
            line, = ax.plot(budgets["ms_p50"], budgets["real_acc_b1"], marker=".", label=f"{label} (seed {seed})")
            exits = g[g["policy"] == "exit"]
            ax.plot(exits["ms_p50"], exits["real_acc_b1"], "x", color=line.get_color())
        ax.set(title=f"Real early exit · {device}", xlabel="measured latency, batch 1 (ms per image, median)",
               ylabel="top-1 accuracy (%)")
        ax.legend(fontsize=8, frameon=False, loc="lower right")
        _accuracy_limits(ax)
    measured = data.loc[data["policy"] == "budget", "p"].nunique()  # `exitbench latency --budgets` may pick a few
    budgets = "the 39 budgets'" if measured == 39 else f"{measured} of the 39 budgets' (--budgets)"
    return _save(fig, out, "latency", f"lines: {budgets} thresholds; crosses: each exit alone")


def _accuracy_limits(ax) -> None:
    """Accuracy lives in [0, 100]."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 100.5))


def _exit_fraction_figure(out, budgets, groups, columns, palette, note) -> list[Path]:
    """Share of test samples leaving at each exit (mean over seeds), at four budgets spread over the protocol's
    range; one bar per group and exit, one legend per row (a legend per panel costs most of the drawing time
    and covers the bars once there are many groups); each panel's title gives its mean expected MACs range."""
    ps = np.sort(budgets["p"].unique())
    chosen = ps[np.unique(np.round(np.linspace(0, len(ps) - 1, 6)[1:-1]).astype(int))] if len(ps) > 4 else ps
    fig, axes = _axes(len(groups), len(chosen), width=4.2, height=3.6)
    for row, ((dataset, backbone), g) in enumerate(groups):
        g = g.assign(dagger=np.where(g["calibration"] == "heldout", "", f" {DAGGER}"))
        bu = budgets[budgets["p"].isin(chosen)].merge(g[[*columns, "dagger"]], on="trial_id")
        unit, scale = macs_scale(bu["expected_macs"].max())
        fractions = [_fractions(v) for v in bu["exit_fractions"]]
        width = max((len(f) for f in fractions), default=0)
        shares = pd.DataFrame([f + [np.nan] * (width - len(f)) for f in fractions], index=bu.index,
                              columns=range(1, width + 1))
        for col, p in enumerate(chosen):
            ax, sel = axes[row, col], bu["p"] == p
            if not width or not sel.any():
                ax.set_axis_off()
                continue
            keys = [bu.loc[sel, k] for k in ("method", "label", "dagger")]
            means, cost = shares[sel].groupby(keys).mean(), bu.loc[sel, "expected_macs"].groupby(keys).mean()
            n_methods = means.index.get_level_values("method").value_counts()
            bar = 0.8 / len(means)
            for j, ((method, label, dagger), values) in enumerate(means.iterrows()):
                # Variants of a method share its colour, lightened one step per variant.
                step = sum(1 for m, *_ in means.index[:j] if m == method) / n_methods[method] * 0.55
                colour = tuple(c + (1 - c) * step for c in palette[method])
                ax.bar(np.arange(1, width + 1) - 0.4 + bar * (j + 0.5), values.to_numpy(), bar, color=colour,
                       hatch=_hatch(palette, method), edgecolor="white", linewidth=0, label=f"{label}{dagger}")
            ax.set(title=f"budget p={p:g} · {cost.min() / scale:.3g}–{cost.max() / scale:.3g} {unit} MACs",
                   xlabel="exit", ylim=(0, 1), xticks=np.arange(1, width + 1),
                   ylabel=f"{dataset} · {backbone}\nfraction of test samples" if col == 0 else "")
            ax.title.set_fontsize(9)
        shown = [ax for ax in axes[row] if ax.axison]
        if shown:
            shown[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False,
                             title=f"mean over seeds\n(MACs: mean expected, {_counter_text(g)})", title_fontsize=7)
    return _save(fig, out, "exit_fractions", note)


def _fractions(value) -> list[float]:
    if isinstance(value, str):
        return [float(v) for v in json.loads(value)]
    return [float(v) for v in value]


# ----------------------------------------------------------------------------------------------- commands

def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UsageError(f"unknown --metric {metric!r}; valid: {', '.join(METRICS)}")


def _out_dir(path: str | Path) -> Path:
    out = Path(path)
    check_output_dir(out, f"--out {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _csv(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, float_format="%.6g")


def _base_groups(runs: pd.DataFrame, baseline: Baseline | None) -> set:
    if baseline is None:
        return set()
    chosen = runs[runs["trial_id"].isin(baseline.trial_ids)]
    return set(map(tuple, chosen[KEYS].drop_duplicates().to_numpy().tolist()))


def build_report(sweep_dir: str | Path, out: str | Path | None = None, baseline: str | None = None,
                 metric: str = "auc", speedup_acc: float | None = None, plots: bool = True,
                 copy_store: bool = False) -> list[Path]:
    """Write the report of one sweep; returns the files written. `baseline=None` means uniform, if present.
    `copy_store`: also copy the sweep's results store (its parquet tables) to `out/store`, so the report can
    be rebuilt from what sits next to it (results/default does this)."""
    _check_metric(metric)
    tables, name = load_runs([str(sweep_dir)])
    out = Path(out) if out is not None else Path(sweep_dir) / "report"
    written = write_report(tables, name, out, baseline, metric, speedup_acc, plots)
    if copy_store and out.resolve() != Path(sweep_dir).resolve():
        written.append(_copy_store(Path(sweep_dir) / "store", out / "store"))
    return written


def _copy_store(store: Path, dest: Path) -> Path:
    """Replace `dest` by the store's tables (the per-trial record JSONs stay behind): built beside it, then
    swapped in, so an interrupted copy never leaves a half store."""
    import shutil

    fresh, stale = dest.with_name(f".{dest.name}.new"), dest.with_name(f".{dest.name}.old")
    for path in (fresh, stale):
        shutil.rmtree(path, ignore_errors=True)
    # the tables' per-trial files only: records stay behind, and compacted files are a cache rebuilt from them
    shutil.copytree(store, fresh, ignore=shutil.ignore_patterns("records", results.COMPACTED, ".*"))
    if dest.exists():
        dest.rename(stale)
    fresh.rename(dest)
    shutil.rmtree(stale, ignore_errors=True)
    return dest


def write_report(tables: results.Tables, name: str, out: str | Path, baseline: str | None = None,
                 metric: str = "auc", speedup_acc: float | None = None, plots: bool = True) -> list[Path]:
    """The report of annotated tables (see `annotate`) into `out`."""
    _check_metric(metric)
    runs = tables.runs
    base, note = resolve_baseline(runs, baseline)
    out = _out_dir(out)
    metrics, curves = trial_metrics(tables)
    agg = aggregate(runs, metrics, tables.exits)
    comp = compare(runs, metrics, curves, base, speedup_acc, metric) if base is not None else pd.DataFrame()
    written = []
    for fname, text in (
        ("table.md", report_markdown(name, runs, agg, comp, tables.exits, base, note, speedup_acc, metric)),
        ("table.csv", _csv(agg)),
        ("table.tex", report_latex(agg)),
        ("comparison.csv", _csv(comp)),
        ("failed.csv", _csv(runs.loc[runs["status"] == "failed",
                                      ["trial_id", "dataset", "backbone", "method", "variant", "seed", "error"]])),
        ("leaderboard.md", leaderboard_markdown(agg, metric, name, comp, base, _base_groups(runs, base),
                                                provenance(runs))),
    ):
        results.atomic_write_text(out / fname, text)
        written.append(out / fname)
    if plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # tight_layout notes
            pairs = paired_trials(runs, metrics, base) if base is not None else None
            written += figures(out, runs, tables, metrics, curves, agg, method_palette(runs["method"]), pairs)
            written += latency_figure(out, runs, getattr(tables, "latency", None))
    return written


def build_leaderboard(sweep_dirs: list[str], out: str | Path, metric: str = "auc",
                      published: list[str] | None = None, baseline: str | None = None) -> list[Path]:
    """One leaderboard of several sweeps; `published` CSV files (or folders of them) add cited rows below,
    labelled and kept out of every statistic (bench.published)."""
    _check_metric(metric)
    from bench import published as published_mod

    cited = published_mod.read_all(published) if published else []
    tables, name = load_runs([str(d) for d in sweep_dirs])
    runs = tables.runs
    base, _ = resolve_baseline(runs, baseline)
    metrics, curves = trial_metrics(tables)
    agg = aggregate(runs, metrics, tables.exits)
    comp = compare(runs, metrics, curves, base, None, metric) if base is not None else pd.DataFrame()
    sources = runs.groupby(KEYS)["source"].agg(lambda s: ", ".join(sorted(set(s))))
    agg["sources"] = sources.reindex(pd.MultiIndex.from_frame(agg[KEYS])).to_numpy()
    out = _out_dir(out)
    written = [out / "leaderboard.md", out / "leaderboard.csv"]
    text = leaderboard_markdown(agg, metric, name, comp, base, _base_groups(runs, base), provenance(runs))
    if cited:
        text = text.rstrip("\n") + "\n\n" + published_mod.markdown(cited)
    results.atomic_write_text(written[0], text)
    results.atomic_write_text(written[1], _csv(agg))
    return written


def cli_report(args) -> int:
    written = build_report(args.sweep_dir, args.out, args.baseline, args.metric,
                           getattr(args, "speedup_acc", None))
    print(f"report of {args.sweep_dir}: {len(written)} files in {written[0].parent}")
    for path in written:
        print(f"  {path}")
    return 0


def cli_leaderboard(args) -> int:
    written = build_leaderboard(args.sweep_dirs, args.out, args.metric, getattr(args, "published", None),
                                getattr(args, "baseline", None))
    print(f"leaderboard of {len(args.sweep_dirs)} sweep(s): {', '.join(str(p) for p in written)}")
    return 0
