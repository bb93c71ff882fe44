"""Results store at the scale of large ablation sweeps: write, compact, load and report times and peak memory.

    .venv/bin/python benchmarks/store_scale.py                      # 1,000 and 10,000 trials
    .venv/bin/python benchmarks/store_scale.py --trials 1000 10000 50000 --workers 2

Each store is synthesised like a real sweep's: a grid of 3 methods x --lrs learning rates, as many seeds as
the trial count asks for (like the issue's measurement, which copied the default sweep's records), every
record with 5 exits, 39 budgets (a real budgeted evaluation of synthetic logits, its accuracies jittered per
trial) and 100 epochs, written through the real per-trial write path (`bench.results.write`: four atomic
parquet files and a JSON record per trial) by --workers processes, since writing is the slow part (about
30 ms per trial and process on an idle core). Then, each in a fresh process so that its peak memory (VmHWM,
imports included) is its own:

- load per-trial: `bench.results.load(dir, compact=False)` before compaction: every per-trial file, as
                  before compaction existed (only up to --per-trial-max trials: it grows 15 ms a trial)
- compact:        `bench.results.compact(dir, settle=True)`, the call that ends a sweep
- load:           `bench.results.load(dir)`, all four tables (--repeats fresh processes, median and fastest)
- load-2:         exits and budgets of one method (a filter on runs), three columns each: epochs is not read
- report:         `exitbench report DIR` (bench.report.build.cli_report, figures included); "in" is the call,
                  "process" the whole command as a user waits for it, interpreter start and imports included

Goals (issue 19): 10,000 trials load < 3 s and report < 15 s, memory < 2 GB, growth 1k -> 10k within 12x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXITS, EPOCHS = 5, 100
METHODS = ("uniform", "distill", "l2w")


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, no usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def positive(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


# ------------------------------------------------------------------------------------------ synthesis

def templates() -> dict[str, dict]:
    """One real evaluation per method (anytime, 39 budgets, summary) of synthetic 5-exit logits."""
    import torch

    from bench.evaluate.protocol import evaluate_logits

    def logits(labels, margin, g):  # the label's logit raised more at deeper exits
        z = torch.randn(EXITS, len(labels), 10, generator=g)
        z[:, torch.arange(len(labels)), labels] += torch.linspace(0.5, 3.0, EXITS)[:, None] * margin
        return z

    out = {}
    for i, method in enumerate(METHODS):
        g = torch.Generator().manual_seed(i)
        val_y, test_y = torch.randint(10, (400,), generator=g), torch.randint(10, (400,), generator=g)
        macs = torch.tensor([1e6 * (k + 1) ** 1.5 for k in range(EXITS)], dtype=torch.float64)
        out[method] = evaluate_logits({"val_logits": logits(val_y, 1 + i / 10, g), "val_labels": val_y,
                                       "test_logits": logits(test_y, 1 + i / 10, g), "test_labels": test_y,
                                       "macs": macs})
    return out


def make_record(index: int, lrs: int, template: dict, config: dict):
    """Trial `index` of the grid: its config, and the template's numbers jittered by a per-trial RNG."""
    import numpy as np

    from bench.results import ResultRecord

    rng = np.random.default_rng(index)
    method, lr_index, seed = METHODS[index % 3], index // 3 % lrs, index // (3 * lrs)
    shift = float(rng.normal(0, 1))
    cfg = json.loads(json.dumps(config))
    cfg["method"] = {"name": method, **({"epsilon": 0.8} if method == "l2w" else {})}
    cfg["optim"]["lr"] = round(0.01 * (1 + lr_index), 4)
    cfg["seed"] = seed
    exits = [{**row, "top1": row["top1"] + shift, "params": 1000 * row["exit"]} for row in template["anytime"]]
    budgets = [{**row, "test_acc": row["test_acc"] + shift + float(rng.normal(0, 0.1))} for row in template["budgets"]]
    epochs = [{"epoch": e + 1, "lr": 0.1, "loss": 2.0 / (e + 1) + abs(shift) / 10, "time_s": 1.5 + rng.random(),
               "images_per_s": 1000.0 + rng.random(),
               **{f"train_loss_{k + 1}": 2.0 / (e + 1) + k / 10 for k in range(EXITS)},
               **{f"train_acc_{k + 1}": min(100.0, 20.0 + e * 0.7 + k) for k in range(EXITS)},
               **{f"val_acc_{k + 1}": min(100.0, 18.0 + e * 0.7 + k + shift) for k in range(EXITS)},
               "val_acc_last": min(100.0, 22.0 + e * 0.7 + shift)} for e in range(EPOCHS)]
    summary = {k: (v + shift if isinstance(v, float) and "acc" in k else v) for k, v in template["summary"].items()}
    return ResultRecord(
        trial_id=f"trial_{index:06d}", sweep="scale", config=cfg, seed=seed,
        versions={"exitbench": "0.1", "torch": "2.x", "ray": "2.x"}, git_commit="0" * 40, wall_time_s=120.0 + shift,
        train_images_per_s=1000.0, counter="fvcore 0.1.5", calibration="heldout",
        data_info={"train": 1437, "val": 160, "test": 200, "val_indices_sha1": "ab" * 20},
        epochs=epochs, exits=exits, budgets=budgets, summary=summary)


def write_chunk(args) -> int:
    sweep_dir, indices, lrs, templ, config = args
    from bench import results

    for i in indices:
        results.write(make_record(i, lrs, templ[METHODS[i % 3]], config), sweep_dir)
    return len(indices)


def write_store(sweep_dir: Path, trials: int, lrs: int, workers: int) -> float:
    from concurrent.futures import ProcessPoolExecutor

    from bench.config import validate_trial

    config = validate_trial({"epochs": EPOCHS, "backbone": {"name": "msdnet-cifar-budget"}}).model_dump(mode="json")
    templ = templates()
    chunks = [range(start, min(trials, start + 200)) for start in range(0, trials, 200)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        done = sum(pool.map(write_chunk, [(str(sweep_dir), c, lrs, templ, config) for c in chunks]))
    assert done == trials
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ phases

def phase(name: str, sweep_dir: str) -> dict:
    """Run in a fresh process: the seconds of one phase and this process's peak RSS."""
    import pyarrow.compute as pc

    from bench import results

    start = time.perf_counter()
    if name == "load-per-trial":
        tables = results.load(sweep_dir, compact=False)
        rows = sum(len(getattr(tables, t)) for t in results.TABLES)
    elif name == "compact":
        rows = sum(c.trials for c in results.compact(sweep_dir, settle=True))
    elif name == "load":
        tables = results.load(sweep_dir)
        rows = sum(len(getattr(tables, t)) for t in results.TABLES)
    elif name == "load-2":
        tables = results.load(sweep_dir, ["exits", "budgets"], columns={
            "exits": ["exit", "top1", "macs"], "budgets": ["p", "test_acc", "expected_macs"]},
            filters={"runs": pc.field("config.method.name") == "l2w"})
        rows = len(tables.exits) + len(tables.budgets)
    elif name == "report":
        from bench.cli.main import main

        out = tempfile.mkdtemp(prefix="store-scale-report-")
        with open(os.devnull, "w") as devnull:
            stdout, sys.stdout = sys.stdout, devnull
            try:
                code = main(["report", sweep_dir, "--out", out])
            finally:
                sys.stdout = stdout
        shutil.rmtree(out, ignore_errors=True)
        if code:
            raise SystemExit(f"exitbench report failed with status {code}")
        rows = 0
    else:
        raise ValueError(name)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": rows, "peak_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_phase(name: str, sweep_dir: Path, repeats: int) -> dict:
    """The phase `repeats` times, each in a fresh process: median seconds, the fastest, the largest peak."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--phase", name, str(sweep_dir)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        if done.returncode:
            raise SystemExit(f"phase {name} failed:\n{done.stderr}")
        runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "process": time.perf_counter() - start})
    return {"seconds": statistics.median(r["seconds"] for r in runs), "min": min(r["seconds"] for r in runs),
            "process": statistics.median(r["process"] for r in runs), "peak_mb": max(r["peak_mb"] for r in runs),
            "rows": runs[0]["rows"]}


def main() -> None:
    p = OneLineErrors(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=positive(1), nargs="+", default=[1000, 10000], help="store sizes")
    p.add_argument("--lrs", type=positive(1), default=10, help="learning rates per method (default 10)")
    p.add_argument("--workers", type=positive(1), default=os.cpu_count() or 1,
                   help="processes writing the per-trial files (default: all cores)")
    p.add_argument("--per-trial-max", type=positive(0), default=1000,
                   help="measure the per-trial load only up to this many trials (default 1000)")
    p.add_argument("--repeats", type=positive(1), default=3,
                   help="runs of each load phase, each in a fresh process (default 3; the median is shown)")
    p.add_argument("--dir", default=None, help="where to build the stores (default: a temp folder, removed)")
    p.add_argument("--reuse", action="store_true",
                   help="with --dir: measure again on stores already there (their compacted files are removed)")
    p.add_argument("--phase", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(*args.phase)))
        return
    if args.dir and Path(args.dir).exists() and not Path(args.dir).is_dir():
        p.error(f"--dir {args.dir}: not a folder")
    root = Path(args.dir or tempfile.mkdtemp(prefix="store-scale-"))
    print(f"{EXITS} exits, 39 budgets, {EPOCHS} epochs per trial; 3 methods x {args.lrs} learning rates x seeds; "
          f"{args.workers} writer processes; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'trials':>7} | {'phase':<15} | {'s':>7} | {'min s':>7} | {'process s':>9} | {'peak MB':>8} | rows")
    figures: dict[int, dict] = {}
    try:
        for n in args.trials:
            sweep_dir = root / f"sweep-{n}"
            runs = sweep_dir / "store" / "runs"
            if args.reuse and runs.is_dir() and sum(1 for _ in runs.glob("*.parquet")) == n:
                shutil.rmtree(sweep_dir / "store" / "compacted", ignore_errors=True)
                print(f"{n:>7} | {'write':<15} | {'':>7} | {'':>7} | {'':>9} | {'':>8} | reused {sweep_dir}",
                      flush=True)
            else:
                shutil.rmtree(sweep_dir, ignore_errors=True)
                wrote = write_store(sweep_dir, n, args.lrs, args.workers)
                print(f"{n:>7} | {'write':<15} | {wrote:>7.1f} | {'':>7} | {'':>9} | {'':>8} | {n} trials, "
                      f"{wrote / n * 1000 * args.workers:.1f} ms per trial per process", flush=True)
            names = (["load-per-trial"] if n <= args.per_trial_max else []) + ["compact", "load", "load-2", "report"]
            figures[n] = {}
            for name in names:
                repeats = args.repeats if name.startswith("load") and name != "load-per-trial" else 1
                r = figures[n][name] = run_phase(name, sweep_dir, repeats)
                print(f"{n:>7} | {name:<15} | {r['seconds']:>7.2f} | {r['min']:>7.2f} | {r['process']:>9.2f} | "
                      f"{r['peak_mb']:>8.0f} | {r['rows'] or ''}", flush=True)
            if not args.dir:
                shutil.rmtree(sweep_dir, ignore_errors=True)
        sizes = sorted(figures)
        for small, large in zip(sizes, sizes[1:]):
            growth = {k: figures[large][k]["seconds"] / figures[small][k]["seconds"]
                      for k in ("load", "report") if k in figures[small]}
            print(f"growth {small} -> {large} trials (x{large / small:g}): "
                  + ", ".join(f"{k} x{v:.1f}" for k, v in growth.items()))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
