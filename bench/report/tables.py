"""The text of a report: cell formatting, the markdown tables of a report (main metrics, intervals, anytime
accuracy per exit, paired comparisons, failed trials), its LaTeX table, the leaderboard, footnotes and the
provenance line."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from bench.report.frame import KEYS, METRICS, Baseline, exit_macs, is_missing
from bench.report.stats import ALPHA, CI_KIND, DIFF_CI_KIND, MIN_SEEDS_FOR_CI

DAGGER = "†"


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
    """The package versions, torch thread count, commits and machines that produced the store's finished trials."""
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
    where = ""
    if "machine.cpu" in done:  # recorded since the trials say where they ran
        machines = sorted({f"{cpu} ({cap})" for cpu, cap in zip(done["machine.cpu"].fillna("?"),
                                                                  done["machine.cpu_capability"].fillna("?"))})
        where = f"; on {', '.join(machines)}"
    return (f"Produced by: {packages}; {thread_text}; git {', '.join(commits) or 'commit not recorded'}{where}.")


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
    if is_missing(error):
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
                         produced: str = "", settings: dict | None = None) -> str:
    """The leaderboard as markdown, one table per dataset x backbone; `settings`: a line under a panel's heading
    ((dataset, backbone) -> text: what differs between the merged sweeps, e.g. MACs and epochs)."""
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
        out += [f"## {dataset} · {backbone}", "", *([settings[(dataset, backbone)], ""]
                                                   if settings and (dataset, backbone) in settings else []),
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
