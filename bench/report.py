"""Comparison tables, leaderboards and figures from a sweep's results store (`exitbench report`, `leaderboard`).

Every number is recomputed from the store's long tables (bench.results), not taken from trial summaries:

- Budgeted curve of a trial: the monotone upper envelope of its operating points -- each budget's
  (expected MACs, test top-1) and each exit run alone for every sample (cumulative MACs, anytime top-1) --
  with linear interpolation between envelope points (routing a random share of samples through either of two
  operating points reaches any point on the segment between them), flat beyond the dearest point (spare
  budget is simply not spent) and undefined below the cheapest one (no model can spend less than exit 1).
- acc@X %: that curve at X % of the trial's last-exit MACs. AUC: the curve's mean over [exit-1 MACs,
  last-exit MACs] (a normalised area, in % top-1). Best: the highest test top-1 among the budgets.
- Trials are grouped by (dataset, backbone, method, varied hyper-parameters: config fields that take more than
  one value within some dataset x backbone x method, seed/name/out_dir aside) and summarised over seeds by
  mean, sample std and the 95 % Student-t interval of the mean.
- Against a baseline method, trials are paired by seed (same dataset, backbone and non-method settings): the
  difference of the two curves at common MACs, and the speed-up at equal accuracy, i.e. the MACs the
  baseline needs to reach an accuracy over the MACs the method needs (geometric mean over seeds, t interval
  on the log ratio).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench import results
from bench.errors import UsageError

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


# ----------------------------------------------------------------------------------------------- curves

@dataclass
class Curve:
    """A trial's budgeted curve as its envelope points (MACs increasing, accuracy strictly increasing)."""

    macs: np.ndarray
    acc: np.ndarray

    @classmethod
    def envelope(cls, macs, acc) -> Curve:
        macs, acc = np.asarray(macs, float), np.asarray(acc, float)
        ok = np.isfinite(macs) & np.isfinite(acc)
        macs, acc = macs[ok], acc[ok]
        order = np.lexsort((-acc, macs))  # by MACs; at equal MACs the best accuracy first
        macs, acc = macs[order], acc[order]
        best_before = np.maximum.accumulate(np.concatenate([[-np.inf], acc]))[:-1]
        keep = acc > best_before  # a point survives only if it beats every cheaper one
        return cls(macs[keep], acc[keep])

    def at(self, m) -> np.ndarray:
        """Accuracy reachable with a budget of `m` MACs (NaN below the cheapest point)."""
        m = np.asarray(m, float)
        if self.macs.size == 0:
            return np.full(m.shape, np.nan)
        return np.where(m < self.macs[0], np.nan, np.interp(m, self.macs, self.acc))

    def macs_to_reach(self, acc: float) -> float:
        """Fewest MACs at which the curve reaches `acc` (NaN if it never does)."""
        if self.macs.size == 0 or not acc <= self.acc[-1]:
            return math.nan
        i = int(np.searchsorted(self.acc, acc))  # first point with accuracy >= acc
        if i == 0:
            return float(self.macs[0])
        m0, m1, a0, a1 = self.macs[i - 1], self.macs[i], self.acc[i - 1], self.acc[i]
        return float(m0 + (acc - a0) / (a1 - a0) * (m1 - m0))

    def mean_over(self, lo: float, hi: float) -> float:
        """Mean accuracy over [lo, hi] MACs (exact for the piecewise-linear curve)."""
        if hi <= lo:
            return float(self.at(lo))
        xs = np.concatenate([[lo], self.macs[(self.macs > lo) & (self.macs < hi)], [hi]])
        ys = self.at(xs)
        return float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)) / (hi - lo))


def trial_metrics(tables: results.Tables) -> tuple[pd.DataFrame, dict[str, Curve]]:
    """Per finished trial: last-exit top-1 and MACs, exit-1 MACs, acc@X %, AUC, best; and its curve."""
    exits = tables.exits if "exit" in tables.exits else pd.DataFrame(columns=["trial_id", "exit", "top1", "macs"])
    budgets = tables.budgets if "test_acc" in tables.budgets else pd.DataFrame(
        columns=["trial_id", "expected_macs", "test_acc"])
    exits_by, budgets_by = dict(tuple(exits.groupby("trial_id"))), dict(tuple(budgets.groupby("trial_id")))
    rows, curves = [], {}
    for tid in tables.runs.loc[tables.runs["status"] == "finished", "trial_id"]:
        ex = exits_by.get(tid, exits.iloc[:0]).sort_values("exit")
        bu = budgets_by.get(tid, budgets.iloc[:0])
        curve = Curve.envelope(np.concatenate([bu["expected_macs"], ex["macs"]]),
                               np.concatenate([bu["test_acc"], ex["top1"]]))
        curves[tid] = curve
        row = {"trial_id": tid, "last_acc": math.nan, "last_macs": math.nan, "first_macs": math.nan,
               "best_acc": float(bu["test_acc"].max()) if len(bu) else math.nan}
        if len(ex):
            lo, hi = float(ex["macs"].iloc[0]), float(ex["macs"].iloc[-1])
            row.update(last_acc=float(ex["top1"].iloc[-1]), last_macs=hi, first_macs=lo, auc=curve.mean_over(lo, hi))
            row.update({f"acc_at_{f}": float(curve.at(f / 100 * hi)) for f in FRACTIONS})
        rows.append(row)
    cols = ["trial_id", "last_acc", "last_macs", "first_macs", "best_acc", "auc", *(f"acc_at_{f}" for f in FRACTIONS)]
    return pd.DataFrame(rows).reindex(columns=cols), curves


# ------------------------------------------------------------------------------------------ statistics

def t_quantile(n: int) -> float:
    """The 97.5 % quantile of Student's t with n - 1 degrees of freedom (NaN for n < 2)."""
    if n < 2:
        return math.nan
    from scipy.special import stdtrit  # inverse t CDF; scipy.stats would add a second of import time

    return float(stdtrit(n - 1, 0.975))


def seed_stats(values) -> dict[str, float]:
    """mean, sample std, n and the 95 % t-interval half-width of the finite values."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    n = v.size
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    return {"mean": float(v.mean()) if n else math.nan, "std": std, "n": n,
            "ci": t_quantile(n) * std / math.sqrt(n) if n > 1 else math.nan}


def t_band(values) -> tuple[float, float]:
    """seaborn errorbar callable: the 95 % t-interval of the mean."""
    s = seed_stats(values)
    return s["mean"] - s["ci"], s["mean"] + s["ci"]


# ------------------------------------------------------------------------------------------------ loading

def load_runs(sweep_dirs: list[str]) -> tuple[results.Tables, str]:
    """Load (and merge) stores; trial ids get a sweep prefix when several are merged. Returns tables, name."""
    merged: dict[str, list[pd.DataFrame]] = {t: [] for t in results.TABLES}
    names = [Path(d).name for d in sweep_dirs]
    for i, sweep_dir in enumerate(sweep_dirs):
        path = Path(sweep_dir)
        source = names[i] if names.count(names[i]) == 1 else f"{i + 1}:{names[i]}"
        if not path.is_dir():
            raise UsageError(f"sweep folder {str(sweep_dir)!r} does not exist")
        tables = results.load(path)
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
    runs = tables.runs
    missing = [c for c in ("config.data.name", "config.backbone.name", "config.method.name", "status", "seed")
               if c not in runs]
    if missing:
        raise UsageError(f"runs table of {', '.join(sweep_dirs)} lacks {', '.join(missing)}; "
                         f"was it written by bench.results.write?")
    runs["dataset"] = runs["config.data.name"].astype(str)
    runs["backbone"] = runs["config.backbone.name"].astype(str)
    runs["method"] = runs["config.method.name"].astype(str)
    for col, default in (("calibration", "heldout"), ("counter", None), ("error", None)):
        if col not in runs:
            runs[col] = default
    runs["calibration"] = runs["calibration"].fillna("heldout")
    varied = varied_columns(runs)
    runs["variant"] = [variant_label(row, varied) for _, row in runs[varied].iterrows()] if varied else ""
    runs["label"] = [f"{m} ({v})" if v else m for m, v in zip(runs["method"], runs["variant"])]
    tables.runs = runs
    name = Path(sweep_dirs[0]).name if len(sweep_dirs) == 1 else ", ".join(Path(d).name for d in sweep_dirs)
    return tables, name


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


def variant_label(row: pd.Series, varied: list[str]) -> str:
    parts = []
    for col in varied:
        value = row[col]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue  # a field this method does not have
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{short_name(col)}={text}")
    return ", ".join(parts)


# -------------------------------------------------------------------------------------------- aggregation

def aggregate(runs: pd.DataFrame, metrics: pd.DataFrame, exits: pd.DataFrame) -> pd.DataFrame:
    """One row per group: seeds, failures, calibration, counter, MACs, and mean/std/ci/n of every metric."""
    per_trial = runs.merge(metrics, on="trial_id", how="left")
    if "exit" in exits:
        anytime = exits.pivot_table(index="trial_id", columns="exit", values="top1")
        anytime.columns = [f"exit{int(k)}_top1" for k in anytime.columns]
        per_trial = per_trial.merge(anytime, left_on="trial_id", right_index=True, how="left")
    exit_cols = sorted((c for c in per_trial if c.startswith("exit") and c.endswith("_top1")),
                       key=lambda c: int(c[4:-5]))
    rows = []
    for key, g in per_trial.groupby(KEYS, sort=True):
        done = g[g["status"] == "finished"]
        row = dict(zip(KEYS, key))
        row.update(label=g["label"].iloc[0], seeds=len(done), failed=int((g["status"] == "failed").sum()),
                   stopped=int((g["status"] == "stopped").sum()),
                   repeated=len(done) - done["seed"].nunique(),
                   calibration=",".join(sorted(set(g["calibration"].astype(str)))),
                   counter=",".join(sorted(set(done["counter"].dropna().astype(str)))),
                   last_macs=float(done["last_macs"].median()) if len(done) else math.nan)
        for m in [*METRICS, *exit_cols]:
            for stat, value in seed_stats(done[m]).items():
                row[f"{m}_{stat}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


def exit_macs(exits: pd.DataFrame, trial_ids) -> dict[int, float]:
    """Median cumulative MACs of each exit over the given trials."""
    if "exit" not in exits:
        return {}
    ex = exits[exits["trial_id"].isin(list(trial_ids))]
    return {int(k): float(v) for k, v in ex.groupby("exit")["macs"].median().items()}


def compare(runs: pd.DataFrame, metrics: pd.DataFrame, curves: dict[str, Curve], baseline: str,
            speedup_acc: float | None) -> pd.DataFrame:
    """Each non-baseline group against the baseline, paired by seed. One row per (group, baseline variant)."""
    done = runs[runs["status"] == "finished"].merge(metrics, on="trial_id")
    shared = [c for c in varied_columns(runs) if not c.startswith("config.method.")]
    pair_on = ["dataset", "backbone", "seed", *shared]
    base = done[done["method"] == baseline]
    others = done[done["method"] != baseline]
    if base.empty or others.empty:
        return pd.DataFrame()
    # Pairing on columns that may be NaN: compare their text so NaN meets NaN.
    keyed = {name: df.assign(**{f"_k{i}": df[c].astype(str) for i, c in enumerate(pair_on)})
             for name, df in (("m", others), ("b", base))}
    on = [f"_k{i}" for i in range(len(pair_on))]
    pairs = keyed["m"].merge(keyed["b"], on=on, suffixes=("", "_base"))
    rows = []
    for key, g in pairs.groupby([*KEYS, "variant_base"], sort=True):
        row = dict(zip([*KEYS, "baseline_variant"], key))
        row.update(label=g["label"].iloc[0], baseline=baseline, pairs=len(g),
                   calibration=",".join(sorted(set(g["calibration"]) | set(g["calibration_base"]))))
        diffs: dict[str, list[float]] = {m: [] for m in METRICS}
        ratios, targets = [], []
        for _, p in g.iterrows():
            mc, bc = curves[p["trial_id"]], curves[p["trial_id_base"]]
            for f in FRACTIONS:  # both curves at the same MACs: f % of the baseline's last exit
                m = f / 100 * p["last_macs_base"]
                diffs[f"acc_at_{f}"].append(float(mc.at(m) - bc.at(m)))
            for m in ("auc", "best_acc", "last_acc"):
                diffs[m].append(p[m] - p[f"{m}_base"])
            target = p["best_acc_base"] if speedup_acc is None else speedup_acc
            targets.append(target)
            ratios.append(bc.macs_to_reach(target) / mc.macs_to_reach(target))
        for m, values in diffs.items():
            for stat, value in seed_stats(values).items():
                row[f"d_{m}_{stat}"] = value
        logs = seed_stats(np.log(ratios))
        row.update(speedup=math.exp(logs["mean"]) if logs["n"] else math.nan,
                   speedup_lo=math.exp(logs["mean"] - logs["ci"]), speedup_hi=math.exp(logs["mean"] + logs["ci"]),
                   speedup_n=logs["n"], speedup_target=float(np.mean(targets)))
        rows.append(row)
    return pd.DataFrame(rows)


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


def main_rows(g: pd.DataFrame) -> list[list[str]]:
    return [[marked(r), seeds_text(r),
             *(fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in ("last_acc", *(f"acc_at_{f}" for f in FRACTIONS),
                                                          "auc", "best_acc"))]
            for _, r in g.iterrows()]


MAIN_HEADER = ["method", "seeds", "last exit", *(f"acc@{f} %" for f in FRACTIONS), "AUC", "best"]


def report_markdown(name: str, runs: pd.DataFrame, agg: pd.DataFrame, comp: pd.DataFrame, exits: pd.DataFrame,
                    baseline: str, baseline_note: str | None, speedup_acc: float | None) -> str:
    n_failed, n_stopped = int((runs["status"] == "failed").sum()), int((runs["status"] == "stopped").sum())
    stopped = f", {n_stopped} stopped early by the scheduler" if n_stopped else ""
    out = [f"# Results: {name}", "",
           f"{len(runs)} trials: {int((runs['status'] == 'finished').sum())} finished, {n_failed} failed{stopped}. "
           "Top-1 accuracy in %, "
           "mean ± std over seeds (95 % t-intervals in `table.csv`). acc@X %: budgeted accuracy at X % of the "
           "last exit's MACs; AUC: mean budgeted accuracy from exit-1 to last-exit MACs; best: best budgeted "
           "accuracy; — : no finished trial, or a budget below the first exit's MACs.", ""]
    for (dataset, backbone), g in panels(agg):
        done_ids = runs.loc[(runs["dataset"] == dataset) & (runs["backbone"] == backbone)
                            & (runs["status"] == "finished"), "trial_id"]
        unit, scale = macs_scale(g["last_macs"].max())
        counter = ", ".join(sorted({c for cs in g["counter"] for c in cs.split(",") if c})) or "counter unknown"
        last = g["last_macs"].max()
        out += [f"## {dataset} · {backbone}", "",
                f"Last exit: {last / scale:.3g} {unit} MACs ({counter})." if np.isfinite(last)
                else "No finished trial.", "", md_table(MAIN_HEADER, main_rows(g)), ""]
        macs = exit_macs(exits, done_ids)
        if macs:
            ks = sorted(macs)
            out += ["Anytime top-1 per exit (cumulative MACs):", "",
                    md_table(["method", *(f"exit {k} ({macs[k] / scale:.3g} {unit})" for k in ks)],
                             [[marked(r), *(fmt(r.get(f"exit{k}_top1_mean", math.nan),
                                                r.get(f"exit{k}_top1_std", math.nan)) for k in ks)]
                              for _, r in g.iterrows()]), ""]
        out += comparison_markdown(comp, dataset, backbone, baseline, baseline_note, speedup_acc)
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


def comparison_markdown(comp, dataset, backbone, baseline, note, speedup_acc) -> list[str]:
    head = [f"### Against {baseline} (paired by seed)", ""]
    if note:
        return [*head, note, ""]
    c = comp[(comp["dataset"] == dataset) & (comp["backbone"] == backbone)] if len(comp) else comp
    if c.empty:
        return [*head, f"No finished {baseline} trial pairs with another method on {dataset} · {backbone}.", ""]
    target = (f"{speedup_acc:g} % top-1" if speedup_acc is not None
              else f"{baseline}'s best budgeted accuracy (per seed)")
    rows = []
    for _, r in c.iterrows():
        vs = f" vs {baseline} ({r['baseline_variant']})" if r["baseline_variant"] else ""
        speed = ("never reached" if r["speedup_n"] == 0 else
                 "×" + fmt_interval(r["speedup"], r["speedup_lo"], r["speedup_hi"], sign=False)
                 + (f" ({r['speedup_n']}/{r['pairs']} reach it)" if r["speedup_n"] < r["pairs"] else ""))
        rows.append([marked(r) + vs, str(r["pairs"]),
                     *(fmt_interval(r[f"d_{m}_mean"], r[f"d_{m}_mean"] - r[f"d_{m}_ci"],
                                    r[f"d_{m}_mean"] + r[f"d_{m}_ci"])
                       for m in (*(f"acc_at_{f}" for f in FRACTIONS), "auc", "best_acc")), speed])
    return [*head, f"Accuracy differences (method − {baseline}, points of top-1) at the same MACs, mean [95 % CI] "
                   f"over seeds; speed-up: {baseline}'s MACs over the method's MACs to reach {target}, geometric "
                   "mean [95 % CI].", "",
            md_table(["method", "pairs", *(f"Δ acc@{f} %" for f in FRACTIONS), "Δ AUC", "Δ best", "speed-up"],
                     rows), ""]


def first_line(error) -> str:
    if error is None or (isinstance(error, float) and math.isnan(error)):
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
    lines = [r"% exitbench report: top-1 (%), mean $\pm$ std over seeds. Needs \usepackage{booktabs}.",
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


def leaderboard_markdown(agg: pd.DataFrame, metric: str, title: str) -> str:
    out = [f"# Leaderboard: {title}", "",
           f"Ranked by {METRICS[metric]} ({metric}), mean ± std over seeds with the 95 % t-interval; top-1 in %.", ""]
    for (dataset, backbone), g in panels(agg):
        g = g.sort_values(f"{metric}_mean", ascending=False, na_position="last")
        rows = []
        for rank, (_, r) in enumerate(g.iterrows(), 1):
            m, ci = r[f"{metric}_mean"], r[f"{metric}_ci"]
            rows.append([str(rank) if np.isfinite(m) else "–", marked(r), fmt(m, r[f"{metric}_std"]),
                         "—" if not np.isfinite(ci) else f"[{m - ci:.2f}, {m + ci:.2f}]",
                         seeds_text(r),
                         *(fmt(r[f"{k}_mean"], r[f"{k}_std"]) for k in ("last_acc", "auc", "best_acc") if k != metric),
                         *([r["sources"]] if "sources" in r else [])])
        others = [METRICS[k] for k in ("last_acc", "auc", "best_acc") if k != metric]
        out += [f"## {dataset} · {backbone}", "",
                md_table(["rank", "method", METRICS[metric], "95 % CI", "seeds", *others,
                          *(["sweeps"] if "sources" in g else [])], rows), ""]
    return "\n".join(out + footnotes(agg))


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

def method_palette(methods) -> dict[str, tuple]:
    """One colour per method, fixed by the sorted method names."""
    import seaborn as sns

    names = sorted(set(methods))
    return dict(zip(names, sns.color_palette("colorblind" if len(names) <= 10 else "husl", len(names))))


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
        fig.savefig(buf, format=ext, dpi=110, bbox_inches="tight")
        results.atomic_write_bytes(out / f"{stem}.{ext}", buf.getvalue())
        written.append(out / f"{stem}.{ext}")
    plt.close(fig)
    return written


def _macs_axis(g: pd.DataFrame, unit: str, what: str = "MACs") -> str:
    return f"{what} ({unit or 'count'}, {_counter_text(g)})"


def _counter_text(g: pd.DataFrame) -> str:
    return ", ".join(sorted(set(g["counter"].dropna().astype(str)))) or "counter unknown"


def _lineplot(ax, data: pd.DataFrame, palette: dict[str, tuple], err_style: str) -> None:
    """Mean over seeds with its 95 % t-interval; colour = method, line style = variant (with its † mark)."""
    import seaborn as sns

    variants = sorted(data["variant"].unique())
    style = "variant" if variants != [""] else None
    sns.lineplot(data=data, x="x", y="y", hue="method", hue_order=[m for m in palette if m in set(data["method"])],
                 palette=palette, style=style, style_order=variants if style else None, errorbar=t_band,
                 err_style=err_style, markers=err_style == "bars", ax=ax, sort=True)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title_fontsize=8, frameon=False)


def figures(out: Path, runs: pd.DataFrame, tables: results.Tables, curves: dict[str, Curve],
            palette: dict[str, tuple]) -> list[Path]:
    """anytime, budgeted and exit_fractions figures (PNG and PDF), one row per dataset x backbone."""
    import matplotlib

    matplotlib.use("Agg")
    done = runs[runs["status"] == "finished"].copy()
    if done.empty or "exit" not in tables.exits:
        return []
    # Calibration only touches the budgeted results: mark those variants, leave the anytime figure alone.
    non_heldout = done["calibration"] != "heldout"
    plain = done.copy()
    done["variant"] = done["variant"].where(~non_heldout, (done["variant"] + f" {DAGGER}").str.strip())
    note = f"{DAGGER} exit thresholds not calibrated on a held-out split" if non_heldout.any() else ""
    groups = list(done.groupby(["dataset", "backbone"], sort=True))
    columns = ["trial_id", "method", "variant", "label"]
    written: list[Path] = []

    fig, axes = _axes(len(groups))
    for ax, ((dataset, backbone), g) in zip(axes[:, 0], groups):
        ex = tables.exits.merge(plain.loc[g.index, columns], on="trial_id")
        unit, scale = macs_scale(ex["macs"].max())
        _lineplot(ax, ex.assign(x=ex["macs"] / scale, y=ex["top1"]), palette, "bars")
        ax.set(title=f"Anytime prediction · {dataset} · {backbone}", xlabel=_macs_axis(g, unit, "cumulative MACs"),
               ylabel="top-1 accuracy (%)")
        _accuracy_limits(ax)
    written += _save(fig, out, "anytime", "")

    # Each trial's curve on a common MACs grid; the band is the 95 % t-interval over seeds at each grid point.
    fig, axes = _axes(len(groups))
    last = tables.exits.groupby("trial_id")["macs"].max()
    for ax, ((dataset, backbone), g) in zip(axes[:, 0], groups):
        own = [curves[t] for t in g["trial_id"] if curves[t].macs.size]
        if not own:
            ax.set_axis_off()
            continue
        hi = max(max(c.macs[-1] for c in own), float(last.reindex(g["trial_id"]).max()))
        grid = np.linspace(min(c.macs[0] for c in own), hi, 81)
        unit, scale = macs_scale(hi)
        data = pd.concat([pd.DataFrame({"trial_id": t, "x": grid / scale, "y": curves[t].at(grid)})
                          for t in g["trial_id"]]).dropna().merge(g[columns], on="trial_id")
        _lineplot(ax, data, palette, "band")
        ax.set(title=f"Budgeted batch · {dataset} · {backbone}", xlabel=_macs_axis(g, unit, "expected MACs"),
               ylabel="top-1 accuracy (%)")
        _accuracy_limits(ax)
    written += _save(fig, out, "budgeted", note)

    budgets = tables.budgets
    if "exit_fractions" in budgets and "p" in budgets and len(budgets):
        written += _exit_fraction_figure(out, budgets, groups, columns, palette, note)
    return written


def _accuracy_limits(ax) -> None:
    """Accuracy lives in [0, 100]; a wide t-band over few seeds must not stretch the axis past it."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 100.5))


def _exit_fraction_figure(out, budgets, groups, columns, palette, note) -> list[Path]:
    """Share of test samples leaving at each exit, at four budgets spread over the protocol's range."""
    ps = np.sort(budgets["p"].unique())
    chosen = ps[np.unique(np.round(np.linspace(0, len(ps) - 1, 6)[1:-1]).astype(int))] if len(ps) > 4 else ps
    fig, axes = _axes(len(groups), len(chosen), width=4.2, height=3.6)
    for row, ((dataset, backbone), g) in enumerate(groups):
        bu = budgets.merge(g[columns], on="trial_id")
        unit, scale = macs_scale(bu["expected_macs"].max())
        for col, p in enumerate(chosen):
            ax, sel = axes[row, col], bu[bu["p"] == p]
            long = pd.DataFrame([{"trial_id": r["trial_id"], "exit": k + 1, "fraction": f}
                                 for _, r in sel.iterrows() for k, f in enumerate(_fractions(r["exit_fractions"]))])
            if long.empty:
                ax.set_axis_off()
                continue
            # Legend entries carry each group's mean expected MACs at this budget.
            cost = sel.groupby(["label", "variant", "method"], as_index=False)["expected_macs"].mean()
            cost["hue"] = [f"{lab}{' ' + DAGGER if DAGGER in v else ''}: {m / scale:.3g} {unit}"
                           for lab, v, m in zip(cost["label"], cost["variant"], cost["expected_macs"])]
            data = long.merge(sel[["trial_id", "label"]], on="trial_id").merge(cost, on="label")
            _bars(ax, data, palette)
            ax.set(title=f"{dataset} · {backbone} · budget p={p:g}", xlabel="exit", ylim=(0, 1),
                   ylabel="fraction of test samples" if col == 0 else "")
            ax.legend(title=f"mean expected MACs ({_counter_text(g)})", fontsize=7, title_fontsize=7)
    return _save(fig, out, "exit_fractions", note)


def _bars(ax, data: pd.DataFrame, palette: dict[str, tuple]) -> None:
    import seaborn as sns

    # Variants of a method share its colour, lightened one step per variant.
    colours = {}
    for method, g in data.drop_duplicates("hue").sort_values("hue").groupby("method"):
        for j, hue in enumerate(g["hue"]):
            share = 0.55 * j / len(g)
            colours[hue] = tuple(c + (1 - c) * share for c in palette[method])
    order = sorted(colours, key=lambda h: (data.loc[data["hue"] == h, "method"].iloc[0], h))
    sns.barplot(data=data, x="exit", y="fraction", hue="hue", hue_order=order, palette=colours, saturation=1,
                errorbar=None, ax=ax)


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
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _csv(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, float_format="%.6g")


def build_report(sweep_dir: str | Path, out: str | Path | None = None, baseline: str | None = None,
                 metric: str = "auc", speedup_acc: float | None = None, plots: bool = True) -> list[Path]:
    """Write the report of one sweep; returns the files written. `baseline=None` means uniform, if present."""
    _check_metric(metric)
    tables, name = load_runs([str(sweep_dir)])
    runs = tables.runs
    methods = sorted(runs["method"].unique())
    chosen = baseline or "uniform"
    note = None
    if chosen not in methods:
        if baseline is not None:
            raise UsageError(f"--baseline {baseline!r} is not a method of this sweep; methods: {', '.join(methods)}")
        note = f"The default baseline {chosen!r} is not in this sweep (methods: {', '.join(methods)}); " \
               "pass --baseline METHOD for paired comparisons."
    out = _out_dir(out if out is not None else Path(sweep_dir) / "report")
    metrics, curves = trial_metrics(tables)
    agg = aggregate(runs, metrics, tables.exits)
    comp = compare(runs, metrics, curves, chosen, speedup_acc) if note is None else pd.DataFrame()
    written = []
    for fname, text in (
        ("table.md", report_markdown(name, runs, agg, comp, tables.exits, chosen, note, speedup_acc)),
        ("table.csv", _csv(agg)),
        ("table.tex", report_latex(agg)),
        ("comparison.csv", _csv(comp)),
        ("failed.csv", _csv(runs.loc[runs["status"] == "failed",
                                      ["trial_id", "dataset", "backbone", "method", "variant", "seed", "error"]])),
        ("leaderboard.md", leaderboard_markdown(agg, metric, name)),
    ):
        results.atomic_write_text(out / fname, text)
        written.append(out / fname)
    if plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # seaborn's notes on single-seed groups, tight_layout
            written += figures(out, runs, tables, curves, method_palette(methods))
    return written


def build_leaderboard(sweep_dirs: list[str], out: str | Path, metric: str = "auc",
                      published: list[str] | None = None) -> list[Path]:
    """One leaderboard of several sweeps; `published` CSV files (or folders of them) add cited rows below,
    labelled and kept out of every statistic (bench.published)."""
    _check_metric(metric)
    from bench import published as published_mod

    cited = published_mod.read_all(published) if published else []
    tables, name = load_runs([str(d) for d in sweep_dirs])
    runs = tables.runs
    metrics, _ = trial_metrics(tables)
    agg = aggregate(runs, metrics, tables.exits)
    sources = runs.groupby(KEYS)["source"].agg(lambda s: ", ".join(sorted(set(s))))
    agg["sources"] = [sources[tuple(r[k] for k in KEYS)] for _, r in agg.iterrows()]
    out = _out_dir(out)
    written = [out / "leaderboard.md", out / "leaderboard.csv"]
    text = leaderboard_markdown(agg, metric, name)
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
    written = build_leaderboard(args.sweep_dirs, args.out, args.metric, getattr(args, "published", None))
    print(f"leaderboard of {len(args.sweep_dirs)} sweep(s): {', '.join(str(p) for p in written)}")
    return 0
