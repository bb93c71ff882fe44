"""How `exitbench report`'s own work grows with the number of trials (the store's reading aside).

Synthesises in memory the four tables of a sweep shaped like a real one (5 exits, 39 budgets, 100 epochs per
trial; 3 methods x lr variants, 5 seeds per group, so groups grow with trials) and times the report on them:
per-trial metrics, aggregation, paired comparisons and tests, text files, and optionally the figures. The
goal (issue 19): no faster than linear growth, i.e. 10x the trials take about 10x the time.

    python benchmarks/report_scale.py                      # 100 and 1000 trials, without figures
    python benchmarks/report_scale.py --trials 100 1000 10000 --plots
    python benchmarks/report_scale.py --groups 3           # few groups, many repeated seeds each
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time

import numpy as np
import pandas as pd

EXITS, BUDGETS, EPOCHS, SEEDS = 5, 39, 100, 5
METHODS = ("uniform", "distill", "l2w")


def synthetic_tables(trials: int, groups: int | None = None, seed: int = 0):
    """`groups=None`: 5 seeds per group (groups grow with trials); else that many groups, seeds 0-4 repeated."""
    from bench import results

    rng = np.random.default_rng(seed)
    ids = np.array([f"t{i:06d}" for i in range(trials)], dtype=object)
    group = np.arange(trials) // SEEDS if groups is None else np.arange(trials) % groups
    method = np.array(METHODS, dtype=object)[group % len(METHODS)]
    seeds = (np.arange(trials) if groups is None else np.arange(trials) // groups) % SEEDS
    runs = pd.DataFrame({
        "trial_id": ids, "sweep": "synthetic", "status": "finished", "error": None, "seed": seeds,
        "counter": "fvcore", "calibration": "heldout", "git_commit": "0" * 40, "data.test_size": 10_000,
        "versions": json.dumps({"torch": "x", "torch_threads": "1"}),
        "config.data.name": "synthetic", "config.backbone.name": "msdnet", "config.method.name": method,
        "config.optim.lr": 0.1 / (1 + group // len(METHODS)), "config.epochs": 100})
    macs = np.cumsum(rng.uniform(1e7, 3e7, EXITS))
    quality = rng.normal(0, 2, trials)[:, None]
    top1 = np.clip(np.linspace(60, 90, EXITS)[None, :] + quality + rng.normal(0, 1, (trials, EXITS)), 0, 100)
    exits = pd.DataFrame({"trial_id": np.repeat(ids, EXITS), "exit": np.tile(np.arange(1, EXITS + 1), trials),
                          "top1": top1.ravel(), "top5": np.minimum(top1.ravel() + 8, 100),
                          "macs": np.tile(macs, trials), "params": np.tile(np.arange(1, EXITS + 1) * 1e5, trials)})
    share = np.linspace(0, 1, BUDGETS)
    fractions = json.dumps([1 / EXITS] * EXITS)
    budget_acc = np.clip(top1[:, :1] + (top1[:, -1:] + 1 - top1[:, :1]) * np.sqrt(share)[None, :]
                         + rng.normal(0, 0.3, (trials, BUDGETS)), 0, 100)
    budgets = pd.DataFrame({"trial_id": np.repeat(ids, BUDGETS), "p": np.tile(np.arange(1, BUDGETS + 1), trials),
                            "test_acc": budget_acc.ravel(), "val_acc": budget_acc.ravel(),
                            "expected_macs": np.tile(macs[0] + (macs[-1] - macs[0]) * share, trials),
                            "exit_fractions": fractions, "thresholds": json.dumps([0.5] * (EXITS - 1) + [None])})
    epochs = pd.DataFrame({"trial_id": np.repeat(ids, EPOCHS), "epoch": np.tile(np.arange(1, EPOCHS + 1), trials),
                           "loss": rng.uniform(0, 2, trials * EPOCHS)})
    return results.Tables(runs=runs, exits=exits, budgets=budgets, epochs=epochs)


def time_report(trials: int, plots: bool, groups: int | None = None) -> float:
    from bench.report import build, frame

    tables = synthetic_tables(trials, groups)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        frame.annotate(tables)
        build.write_report(tables, "synthetic", out, baseline="uniform", plots=plots)
        return time.perf_counter() - start


def parse(argv: list[str]) -> tuple[list[int], bool, int | None]:
    trials, plots, groups, i = [], False, None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--plots":
            plots = True
        elif arg == "--groups":
            i += 1
            if i >= len(argv) or not argv[i].isdigit() or int(argv[i]) < 1:
                sys.exit(f"--groups: expected an integer >= 1, got {argv[i] if i < len(argv) else 'nothing'!r}")
            groups = int(argv[i])
        elif arg == "--trials":
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                if not argv[i].isdigit() or int(argv[i]) < SEEDS:
                    sys.exit(f"--trials: expected integers >= {SEEDS}, got {argv[i]!r}")
                trials.append(int(argv[i]))
            if not trials:
                sys.exit("--trials: expected one or more integers")
        else:
            sys.exit(f"unknown argument {arg!r}; usage: report_scale.py [--trials N ...] [--groups G] [--plots]")
        i += 1
    return trials or [100, 1000], plots, groups


def main(argv: list[str]) -> None:
    trials, plots, groups = parse(argv)
    time_report(min(trials), plots, groups)  # warm-up: imports (pandas, scipy, matplotlib) out of the timings
    shape = f"{SEEDS} seeds per group" if groups is None else f"{groups} groups, seeds 0-{SEEDS - 1} repeated"
    print(f"report {'with' if plots else 'without'} figures; {EXITS} exits, {BUDGETS} budgets, {shape}")
    first = None
    for n in trials:
        seconds = time_report(n, plots, groups)
        first = first or (n, seconds)
        growth = f"  ({seconds / first[1]:.1f}x the time of {first[0]} trials for {n / first[0]:.0f}x the trials)"
        print(f"{n:>7} trials: {seconds:7.2f} s, {1e3 * seconds / n:6.2f} ms/trial{growth if n != first[0] else ''}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
