"""Seconds per training iteration of every registered strategy against `uniform`, and peak memory.

    .venv/bin/python benchmarks/strategy_speed.py             # every strategy, msdnet-cifar-budget, batch 64
    .venv/bin/python benchmarks/strategy_speed.py --methods uniform pcgrad cagrad --repeats 5

Each strategy runs with its registered defaults (what `method: {name: ...}` trains), 2 torch threads,
random 32x32 inputs, 100 classes, SGD (lr 0.1, momentum 0.9, weight decay 1e-4). Protocol as
benchmarks/l2w_speed.py: every strategy alone in a fresh process, the processes alternated strategy after
strategy for --repeats repetitions; a process times --rounds iterations after --warmup and keeps its fastest,
in wall-clock time and in the CPU time of the process (all threads). The ratios use CPU time: on a machine
shared with other jobs the wall clock of one process varies several-fold with the others' load, its CPU time
far less. An epoch-level strategy's end-of-epoch work (Meta-GF's fusion pass) is timed once over the
process's batches and added per batch, so an iteration is what one batch of an epoch costs. Printed per
strategy: wall and CPU seconds per iteration (medians over processes), the end-of-epoch share, the CPU
ratio to uniform's, the median [range] of the ratios to the adjacent uniform process, and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from l2w_speed import OneLineErrors, at_least, batches  # noqa: E402  (same protocol, same helpers)


def build(backbone: str, method: str, classes: int, steps: int):
    """The strategy as a trial builds it (with its readout); the timed steps are the first of 10 epochs of
    `steps` each, so two-stage strategies (ztw) time their main stage."""
    import torch

    from bench.readout import build_readout
    from bench.registry import BACKBONES, METHODS, load_all

    load_all()
    torch.manual_seed(0)
    model = BACKBONES.build(backbone, {}, num_classes=classes, in_channels=3, image_size=32)
    model.train()
    readout = build_readout({"name": method}, model.num_exits, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return METHODS.build(method, {}, model=model, optimizer=optimizer, total_steps=10 * steps, steps_per_epoch=steps,
                         readout=readout)


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    strategy = build(args.backbone, args.method, args.classes, args.warmup + args.rounds)
    data = batches(args.batch, args.classes)
    wall, cpu = [], []
    for it in range(args.warmup + args.rounds):
        x, y = data[it % 2]
        t0, c0 = time.perf_counter(), time.process_time()
        strategy.step(x, y, it)
        if it >= args.warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    strategy.end_epoch(0, data)
    epoch_wall, epoch_cpu = (time.perf_counter() - t0) / len(data), (time.process_time() - c0) / len(data)
    return {"wall_s": min(wall) + epoch_wall, "cpu_s": min(cpu) + epoch_cpu, "epoch_cpu_s": epoch_cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(args, method: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--backbone", args.backbone, "--batch",
           str(args.batch), "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--threads",
           str(args.threads), "--classes", str(args.classes)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  the run of {method} failed:\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = OneLineErrors(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="msdnet-cifar-budget")
    ap.add_argument("--methods", nargs="+", help="registered strategies (default: all; uniform is always run)")
    ap.add_argument("--batch", type=at_least(2), default=64)
    ap.add_argument("--repeats", type=at_least(1), default=3, help="fresh processes per strategy, alternated")
    ap.add_argument("--rounds", type=at_least(1), default=3, help="timed iterations per process")
    ap.add_argument("--warmup", type=at_least(0), default=1)
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--classes", type=at_least(2), default=100)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    from bench.registry import BACKBONES, METHODS, load_all

    load_all()
    if args.backbone not in BACKBONES:
        ap.error(f"--backbone {args.backbone!r} is not registered; one of {', '.join(BACKBONES.all_names())}")
    unknown = [m for m in args.methods or [] if m not in METHODS]
    if unknown:
        ap.error(f"--methods {unknown[0]!r} is not registered; one of {', '.join(METHODS.all_names())}")
    methods = ["uniform", *[m for m in (args.methods or METHODS.names()) if m != "uniform"]]

    print(f"backbone {args.backbone}, batch {args.batch}, {args.threads} threads, {args.classes} classes, 32x32 "
          f"random inputs, registered defaults; {args.repeats} alternated processes per strategy, each the fastest "
          f"of {args.rounds} iterations after {args.warmup} warm-up")
    runs: dict[str, list[dict | None]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            runs[method].append(run_child(args, method))
            print(f"  done: {method} {runs[method][-1]}", file=sys.stderr, flush=True)  # progress (table: stdout)
    base = [r["cpu_s"] for r in runs["uniform"] if r]
    uniform_cpu = statistics.median(base) if base else None
    print("\n(wall s: median over processes of the fastest iteration; cpu s: the same in CPU time of the process, "
          "all threads; end/b: the end-of-epoch work's CPU time per batch, included; x: cpu s over uniform's; "
          "x/pair: median [range] of the cpu ratios to the adjacent uniform process)")
    print(f"  {'strategy':<14}{'wall s':>9}{'cpu s':>9}{'end/b':>9}{'x':>7}{'x/pair':>9}  {'range':<13}"
          f"{'peak RSS MB':>11}")
    for method, results in runs.items():
        done = [r for r in results if r]
        if not done:
            continue
        wall, cpu = (statistics.median(r[key] for r in done) for key in ("wall_s", "cpu_s"))
        end = statistics.median(r["epoch_cpu_s"] for r in done)
        ratio = f"{cpu / uniform_cpu:.2f}" if uniform_cpu else "-"
        pairs = [r["cpu_s"] / u["cpu_s"] for r, u in zip(results, runs["uniform"]) if r and u]
        pair = f"{statistics.median(pairs):.2f}" if pairs else "-"
        spread = f"[{min(pairs):.2f}, {max(pairs):.2f}]" if pairs else ""
        rss = max(r["peak_rss_mb"] for r in done)
        print(f"  {method:<14}{wall:>9.3f}{cpu:>9.3f}{end:>9.3f}{ratio:>7}{pair:>9}  {spread:<13}{rss:>11.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
