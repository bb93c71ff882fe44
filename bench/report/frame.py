"""The numbers of a report as data frames: runs loaded from results stores and labelled, per-trial metrics,
groups summarised over seeds, the baseline and the paired comparisons against it.

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
  mean, sample std and, for n >= 3 seeds, the 95 % logit-t interval of the mean (bench.report.stats).
- Against a baseline -- a method's default variant (its registered default parameters), or a variant named
  as the tables print it -- every other group, the baseline's own variants included, is paired by seed
  (same dataset, backbone and non-method settings; repeated seeds matched in trial-id order): the
  difference of the two curves at common MACs with its paired t-interval (n >= 3), the speed-up at equal
  accuracy (the MACs the baseline needs to reach an accuracy over the MACs the method needs; geometric mean,
  t-interval on the log ratio), and, on the ranking metric, a paired t-test and an exact sign-flip
  permutation test, their p-values Holm-corrected over the comparisons of one report.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench import results
from bench.errors import UsageError
from bench.evaluate.curves import Curves
from bench.report.stats import (
    DEFAULT_TEST_SIZE,
    holm,
    logit_scale,
    logit_t_bounds,
    paired_t_p,
    sign_flip_p,
    t_bounds,
)

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


def is_missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _label_value(value) -> str:
    if is_missing(value):
        return ""  # a field this method does not have
    return f"{value:g}" if isinstance(value, float) else str(value)


def _key_value(value) -> str:
    """A config value as comparable text: NaN meets None, 5 meets 5.0 (parquet widens ints next to NaN)."""
    if is_missing(value):
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

def trial_test_sizes(runs: pd.DataFrame) -> np.ndarray:
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
    logits = pd.DataFrame(np.where(np.isfinite(values[accs]),
                                   logit_scale(values[accs].fillna(50), trial_test_sizes(per_trial)[:, None]), np.nan),
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


# What a trial's numbers depend on besides its config and seed: a comparison across them compares machines too.
PROVENANCE_COLUMNS = {"machine.cpu": "CPU models", "machine.cpu_capability": "CPU instruction sets",
                      "machine.gpu": "GPUs", "versions": "library versions", "data.files_sha256": "dataset files"}


def mixed_provenance(runs: pd.DataFrame) -> list[str]:
    """One line per thing that differs among the finished trials of one dataset (devices, library versions,
    the dataset files' checksums): same seed, same config, other numbers."""
    done = runs[runs["status"] == "finished"]
    lines = []
    for dataset, group in done.groupby("dataset", sort=True):
        for column, what in PROVENANCE_COLUMNS.items():
            if column not in group:
                continue
            values = group[column].dropna()
            if column == "versions":  # the thread count is part of the config; the packages are what matter
                values = values.map(lambda text: json.dumps({k: v for k, v in json.loads(text).items()
                                                             if k != "torch_threads"}, sort_keys=True))
            distinct = sorted(set(values))
            if len(distinct) > 1:
                shown = "; ".join(v if len(v) <= 60 else v[:12] + "…" for v in distinct[:3])
                lines.append(f"{dataset}: trials differ in {what} ({len(distinct)}: {shown}), so equal seeds need "
                             f"not give equal numbers")
    return lines
