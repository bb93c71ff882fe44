"""A report or leaderboard written into a folder, and the `exitbench report` / `leaderboard` commands: load the
stores (bench.report.frame), compute, then write the tables (bench.report.tables), the figures
(bench.report.figures) and, on a leaderboard, the cited published rows (bench.report.published)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pandas as pd

from bench import results
from bench.errors import UsageError, check_output_dir
from bench.report.figures import figures, latency_figure, leaderboard_figure, method_palette
from bench.report.frame import (
    KEYS,
    METRICS,
    Baseline,
    aggregate,
    compare,
    load_runs,
    mixed_provenance,
    paired_trials,
    resolve_baseline,
    trial_metrics,
)
from bench.report.tables import leaderboard_markdown, macs_scale, provenance, report_latex, report_markdown


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
    warn_mixed(tables.runs)
    out = Path(out) if out is not None else Path(sweep_dir) / "report"
    written = write_report(tables, name, out, baseline, metric, speedup_acc, plots)
    if copy_store and out.resolve() != Path(sweep_dir).resolve():
        written.append(_copy_store(Path(sweep_dir) / "store", out / "store"))
    return written


def warn_mixed(runs: pd.DataFrame) -> None:
    """One warning line on stderr per difference in where the compared trials ran (bench.report.frame)."""
    for line in mixed_provenance(runs):
        print(f"exitbench: warning: {line}", file=sys.stderr)


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
            written += figures(out, runs, tables, metrics, curves, agg, method_palette(runs["label"]), pairs)
            written += latency_figure(out, runs, getattr(tables, "latency", None))
    return written


def build_leaderboard(sweep_dirs: list[str], out: str | Path, metric: str = "auc",
                      published: list[str] | None = None, baseline: str | None = None) -> list[Path]:
    """One leaderboard of several sweeps; `published` CSV files (or folders of them) add cited rows below,
    labelled and kept out of every statistic (bench.report.published)."""
    _check_metric(metric)
    from bench.report import published as published_mod

    cited = published_mod.read_all(published) if published else []
    tables, name = load_runs([str(d) for d in sweep_dirs])
    runs = tables.runs
    warn_mixed(runs)
    base, _ = resolve_baseline(runs, baseline)
    metrics, curves = trial_metrics(tables)
    agg = aggregate(runs, metrics, tables.exits)
    comp = compare(runs, metrics, curves, base, None, metric) if base is not None else pd.DataFrame()
    sources = runs.groupby(KEYS)["source"].agg(lambda s: ", ".join(sorted(set(s))))
    agg["sources"] = sources.reindex(pd.MultiIndex.from_frame(agg[KEYS])).to_numpy()
    out = _out_dir(out)
    written = [out / "leaderboard.md", out / "leaderboard.csv"]
    settings = panel_settings(runs, agg)
    text = leaderboard_markdown(agg, metric, name, comp, base, _base_groups(runs, base), provenance(runs), settings)
    if cited:
        text = text.rstrip("\n") + "\n\n" + published_mod.markdown(cited)
    results.atomic_write_text(written[0], text)
    results.atomic_write_text(written[1], _csv(agg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tight_layout notes
        written += leaderboard_figure(out, agg, metric, settings, method_palette(agg["label"]))
    return written


def panel_settings(runs: pd.DataFrame, agg: pd.DataFrame) -> dict[tuple[str, str], str]:
    """What a reader must know to compare the panels of a leaderboard of several sweeps: each dataset x backbone's
    MACs at the last exit and its training epochs, each only when the panels differ in it (a leaderboard whose
    panels share both says nothing more)."""
    if runs["source"].nunique() < 2 or agg.empty:
        return {}
    done = runs[runs["status"] == "finished"]
    facts: dict[tuple[str, str], dict[str, str]] = {}
    for (dataset, backbone), g in agg.groupby(["dataset", "backbone"], sort=True):
        macs = sorted({float(m) for m in g["last_macs"] if pd.notna(m)})
        mine = done[(done["dataset"] == dataset) & (done["backbone"] == backbone)]
        epochs = sorted({int(e) for e in mine.get("config.epochs", pd.Series(dtype=float)).dropna()})
        counter = ", ".join(sorted({str(c) for c in g["counter"].dropna()})) or "counter unknown"
        facts[(dataset, backbone)] = {
            "macs": f"{_macs_text(macs[0], macs[-1])} MACs at the last exit ({counter})" if macs else "",
            "epochs": (" / ".join(map(str, epochs)) + (" epoch" if epochs == [1] else " epochs")) if epochs else ""}
    differing = [k for k in ("macs", "epochs") if len({f[k] for f in facts.values()}) > 1]
    if not differing:
        return {}
    return {panel: "Setting: " + " · ".join(f[k] for k in differing if f[k]) + f" ({_sources(runs, panel)})."
            for panel, f in facts.items()}


def _macs_text(low: float, high: float) -> str:
    """'11.25 M', or '11.25–11.27 M' where the groups differ (a readout's MACs)."""
    unit, scale = macs_scale(high)
    low_text, high_text = f"{low / scale:.4g}", f"{high / scale:.4g}"
    return f"{low_text}–{high_text} {unit}" if low_text != high_text else f"{high_text} {unit}".rstrip()


def _sources(runs: pd.DataFrame, panel: tuple[str, str]) -> str:
    chosen = runs[(runs["dataset"] == panel[0]) & (runs["backbone"] == panel[1])]
    names = sorted(set(chosen["source"].astype(str)))
    return ("sweep " if len(names) == 1 else "sweeps ") + ", ".join(names)


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
