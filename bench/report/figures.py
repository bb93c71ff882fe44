"""The figures of a report (PNG and PDF): anytime accuracy, budgeted curves with their logit-t bands, paired
differences to the baseline along the budget, exit fractions and measured latency; the method palette with
its line styles and hatches. matplotlib and seaborn are imported only when a figure is drawn."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench import results
from bench.evaluate.curves import Curves
from bench.report.frame import METRICS, trial_test_sizes
from bench.report.stats import CI_KIND, DEFAULT_TEST_SIZE, DIFF_CI_KIND, MIN_SEEDS_FOR_CI, logit_t, t_bounds
from bench.report.tables import DAGGER, macs_scale

LINESTYLES = ("-", "--", ":", "-.")


PALETTE_SIZE = 10  # seaborn's colorblind palette


def method_palette(groups) -> dict[str, tuple]:
    """One colour per group, fixed by the sorted group names: seaborn's colorblind palette. A report passes its
    groups' labels (a method, or a method's variant such as 'l2w (epsilon=0.4)'), so the variants of an ablation
    get colours of their own, not one colour with its lines over each other's bands. Past ten groups the colours
    repeat, and each repeat draws its lines in other styles (`method_line_style`) and its bars hatched
    (`method_hatch`): evenly spaced hues (husl) grow too close to tell neighbours apart."""
    import seaborn as sns

    colours = sns.color_palette("colorblind", PALETTE_SIZE)
    return {name: colours[i % PALETTE_SIZE] for i, name in enumerate(sorted(set(groups)))}


def _repeat(palette: dict[str, tuple], group: str) -> int:
    """How many times the palette had gone round before `group`'s colour (0 for the first ten groups)."""
    return sorted(palette).index(group) // PALETTE_SIZE


def method_line_style(palette: dict[str, tuple], group: str, variant: int = 0) -> str:
    """Lines of one colour take the line styles in turn (`variant`: e.g. a group against several baseline
    variants); a repeated colour starts two styles further on."""
    return LINESTYLES[(variant + 2 * _repeat(palette, group)) % len(LINESTYLES)]


def method_hatch(palette: dict[str, tuple], method: str) -> str | None:
    return (None, "//", "..", "xx")[_repeat(palette, method) % 4]


def _axes(n_rows: int, n_cols: int = 1, width: float = 6.5, height: float = 4.0):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    return fig, axes


def save_figure(fig, out: Path, stem: str, note: str) -> list[Path]:
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


def plot_series(g: pd.DataFrame, agg: pd.DataFrame, palette: dict[str, tuple]):
    """Per (method, variant) of a panel's finished trials: trial ids, colour, line style and legend label
    (`palette`: by group label, see method_palette). The label gives n and marks groups with fewer seeds than the
    panel's fullest, failed or stopped trials, and those with too few seeds for an interval."""
    info = agg.set_index(["method", "variant"])
    full = int(info["seeds"].max()) if len(info) else 0
    for method, by_method in g.groupby("method", sort=True):
        for variant, grp in by_method.groupby("variant", sort=True):
            group = grp["label"].iloc[0]
            r = info.loc[(method, variant)]
            r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
            n = int(r["seeds"])
            notes = [f"+{int(r[k])} {k}" for k in ("failed", "stopped") if r[k]]
            text = f"{grp['display'].iloc[0]} · n = {n}" + (f" of {full}" if n < full else "")
            text += f" ({', '.join(notes)})" if notes else ""
            text += f": no CI (n < {MIN_SEEDS_FOR_CI})" if n < MIN_SEEDS_FOR_CI else ""
            yield grp["trial_id"].to_numpy(), palette[group], method_line_style(palette, group), text


def _legend(ax, ci_handle, with_ci: bool, title: str = "mean over seeds") -> None:
    handles, labels = ax.get_legend_handles_labels()
    extra = [ci_handle] if with_ci else []  # name the interval only where one is drawn
    ax.legend([*handles, *extra], [*labels, *(h.get_label() for h in extra)], loc="upper left",
              bbox_to_anchor=(1.01, 1), fontsize=8, title=title, title_fontsize=8, frameon=False)


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
    sizes = pd.Series(trial_test_sizes(done), index=done["trial_id"].to_numpy())
    written: list[Path] = []
    with_ci = bool((agg["seeds"] >= MIN_SEEDS_FOR_CI).any())

    fig, axes = _axes(len(groups))
    for ax, ((dataset, backbone), g) in zip(axes[:, 0], groups):
        ex = tables.exits[tables.exits["trial_id"].isin(g["trial_id"])]
        top1 = ex.pivot_table(index="trial_id", columns="exit", values="top1")
        unit, scale = macs_scale(ex["macs"].max())
        x = ex.groupby("exit")["macs"].median().reindex(top1.columns).to_numpy() / scale
        series = list(plot_series(g.assign(display=g["label"]), agg, palette))
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
    written += save_figure(fig, out, "anytime", "")

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
        for ids, colour, style, text in plot_series(g, agg, palette):
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
    written += save_figure(fig, out, "budgeted", note)

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
        shaded = False
        for _, by_group in panel.groupby(["method", "variant"], sort=True):
            for j, (_, grp) in enumerate(by_group.groupby("variant_base", sort=True)):  # one per baseline variant
                mine, theirs = curves.take(grp["trial_id"]), curves.take(grp["trial_id_base"])
                mean, lo, hi, complete = difference_band(mine, theirs, grp["last_macs_base"], DIFF_GRID)
                n = len(grp)
                label = f"{grp['label'].iloc[0]} · n = {n} pairs" + (
                    f": no CI (n < {MIN_SEEDS_FOR_CI})" if n < MIN_SEEDS_FOR_CI else "")
                group = grp["label"].iloc[0]
                colour = palette.get(group, "grey")
                ax.plot(DIFF_GRID, mean, color=colour, linestyle=method_line_style(palette, group, j)
                        if group in palette else LINESTYLES[j % len(LINESTYLES)], label=label)
                band = complete & np.isfinite(lo)
                ax.fill_between(DIFF_GRID, lo, hi, where=band, color=colour, alpha=0.15, linewidth=0)
                shaded = shaded or bool(band.any())
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(title=f"Paired differences vs {base_label} · {dataset} · {backbone}",
               xlabel=f"budget (% of the {base_label} trial's last-exit MACs)",
               ylabel="Δ top-1 accuracy (points)")
        # the lines: the mean over pairs (same seed) of each trial's budgeted accuracy minus its baseline
        # trial's; a band only where there are enough pairs, and the legend names it only when one is drawn
        _legend(ax, Patch(color="grey", alpha=0.3, label=f"shaded: {DIFF_CI_KIND} (n ≥ {MIN_SEEDS_FOR_CI} pairs)"),
                shaded, title=f"mean paired difference\n(minus the same seed's {base_label})")
    return save_figure(fig, out, "differences", note)


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
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: covers no point
        _accuracy_limits(ax)
    measured = data.loc[data["policy"] == "budget", "p"].nunique()  # `exitbench latency --budgets` may pick a few
    budgets = "the 39 budgets'" if measured == 39 else f"{measured} of the 39 budgets' (--budgets)"
    return save_figure(fig, out, "latency", f"lines: {budgets} thresholds; crosses: each exit alone"
                       + _images_measured(data, runs))


def _images_measured(data: pd.DataFrame, runs: pd.DataFrame) -> str:
    """'; measured on the first 200 of the 10,000 test images (--limit)' when `exitbench latency --limit` cut the
    test split short (the latency rows' `images` against the trials' test split size); '' otherwise."""
    if "images" not in data or "data.test_size" not in runs:
        return ""
    sizes = data.merge(runs[["trial_id", "data.test_size"]], on="trial_id")
    short = sizes[sizes["images"] < sizes["data.test_size"]]
    if short.empty:
        return ""
    used, total = sorted(set(short["images"].astype(int))), sorted(set(short["data.test_size"].astype(int)))
    return (f"; measured on the first {' / '.join(f'{n:,}' for n in used)} of the "
            f"{' / '.join(f'{n:,}' for n in total)} test images (--limit)")


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
            bar = 0.8 / len(means)
            for j, ((_, label, dagger), values) in enumerate(means.iterrows()):
                # each group (a method or one of its variants) in its own colour, as in the other figures
                ax.bar(np.arange(1, width + 1) - 0.4 + bar * (j + 0.5), values.to_numpy(), bar,
                       color=palette.get(label, "grey"), hatch=method_hatch(palette, label) if label in palette
                       else None, edgecolor="white", linewidth=0, label=f"{label}{dagger}")
            ax.set(title=f"budget p = {p:g} of 39 · {cost.min() / scale:.3g}–{cost.max() / scale:.3g} {unit} MACs",
                   xlabel="exit", ylim=(0, 1), xticks=np.arange(1, width + 1),
                   ylabel=f"{dataset} · {backbone}\nfraction of test samples" if col == 0 else "")
            ax.title.set_fontsize(9)
        shown = [ax for ax in axes[row] if ax.axison]
        if shown:
            shown[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False,
                             title=f"mean over seeds\n(MACs: mean expected, {_counter_text(g)})", title_fontsize=7)
    budget = ("p: the budget of the MSDNet budgeted-batch protocol, 1 (cheapest) to 39; its exit proportions "
              "follow (p/20)^k, so the early exits take most samples at small p")
    return save_figure(fig, out, "exit_fractions", "\n".join(filter(None, [budget, note])))


def _fractions(value) -> list[float]:
    if isinstance(value, str):
        return [float(v) for v in json.loads(value)]
    return [float(v) for v in value]


def leaderboard_figure(out: Path, agg: pd.DataFrame, metric: str, settings: dict | None,
                       palette: dict[str, tuple]) -> list[Path]:
    """The leaderboard as dots: per dataset x backbone (one panel each, ranked best on top), each group's mean
    `metric` over seeds with its 95 % logit-t interval as a bar (none for n < 3); a panel's title carries its
    setting line (MACs, epochs) when the merged sweeps differ in it."""
    import matplotlib

    matplotlib.use("Agg")
    if agg.empty or f"{metric}_mean" not in agg:
        return []
    import matplotlib.pyplot as plt

    groups = list(agg.groupby(["dataset", "backbone"], sort=True))
    heights = [0.3 * len(g) + 1.0 for _, g in groups]  # one row of the panel per group, room for the titles
    fig, axes = plt.subplots(len(groups), 1, figsize=(6.5, sum(heights) + 0.8 * len(groups)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, ((dataset, backbone), g) in zip(axes[:, 0], groups):
        g = g.sort_values(f"{metric}_mean", ascending=True, na_position="first", kind="stable")
        y = np.arange(len(g))
        for yi, (_, r) in zip(y, g.iterrows()):
            colour = palette.get(r["label"], "grey")  # a repeated colour (past ten groups) gets another marker
            marker = "osD^"[_repeat(palette, r["label"]) % 4] if r["label"] in palette else "o"
            ax.plot([r[f"{metric}_mean"]], [yi], marker, color=colour)
            if np.isfinite(r[f"{metric}_lo"]):
                ax.plot([r[f"{metric}_lo"], r[f"{metric}_hi"]], [yi, yi], color=colour, linewidth=2)
        ax.set_yticks(y, [f"{r['label']} (n = {int(r['seeds'])})" for _, r in g.iterrows()], fontsize=8)
        setting = (settings or {}).get((dataset, backbone), "").removeprefix("Setting: ").rstrip(".")
        ax.set_title(f"{dataset} · {backbone}" + (f"\n{setting}" if setting else ""), fontsize=9)
        ax.set_xlabel(f"{METRICS[metric]} (top-1 %): mean over seeds, bar: {CI_KIND} (n ≥ {MIN_SEEDS_FOR_CI})")
        ax.set_ylim(-0.6, len(g) - 0.4)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out, "leaderboard", "")
