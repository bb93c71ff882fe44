"""Seconds per training iteration of every registered strategy against `uniform`, and peak memory.

    .venv/bin/python benchmarks/strategy_speed.py             # every strategy, msdnet-cifar-budget, batch 64
    .venv/bin/python benchmarks/strategy_speed.py --methods uniform pcgrad cagrad --repeats 5

Each strategy runs with its registered defaults (what `method: {name: ...}` trains), 2 torch threads,
random 32x32 inputs, 100 classes, SGD (lr 0.1, momentum 0.9, weight decay 1e-4). Protocol as
benchmarks/l2w_speed.py: every strategy alone in a fresh process, the processes alternated strategy after
strategy for --repeats repetitions; a process times --rounds iterations after --warmup and keeps its fastest.
An epoch-level strategy's end-of-epoch work (Meta-GF's fusion pass) is timed once over the process's
batches and added per batch, so `s/iter` is what one batch of an epoch costs. Printed per strategy: the
step, the end-of-epoch share per batch, their sum, its ratio to uniform's (median over processes), the median
[range] of the ratios to the adjacent uniform process, and the largest peak RSS.
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
    wall = []
    for it in range(args.warmup + args.rounds):
        x, y = data[it % 2]
        t0 = time.perf_counter()
        strategy.step(x, y, it)
        if it >= args.warmup:
            wall.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    strategy.end_epoch(0, data)
    epoch_level = (time.perf_counter() - t0) / len(data)
    return {"step_s": min(wall), "epoch_s": epoch_level,
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
    total = {m: [r["step_s"] + r["epoch_s"] if r else None for r in rs] for m, rs in runs.items()}
    base = [t for t in total["uniform"] if t]
    uniform_s = statistics.median(base) if base else None
    print("\n(step: median over processes of the fastest step; epoch/b: end-of-epoch work per batch; x: s/iter "
          "over uniform's; x/pair: median [range] of the ratios to the adjacent uniform process)")
    print(f"  {'strategy':<14}{'step s':>9}{'epoch/b s':>11}{'s/iter':>9}{'x':>7}{'x/pair':>9}  {'range':<13}"
          f"{'peak RSS MB':>11}")
    for method, results in runs.items():
        done = [r for r in results if r]
        if not done:
            continue
        step = statistics.median(r["step_s"] for r in done)
        epoch = statistics.median(r["epoch_s"] for r in done)
        seconds = statistics.median(t for t in total[method] if t)
        ratio = f"{seconds / uniform_s:.2f}" if uniform_s else "-"
        pairs = [t / u for t, u in zip(total[method], total["uniform"]) if t and u]
        pair = f"{statistics.median(pairs):.2f}" if pairs else "-"
        spread = f"[{min(pairs):.2f}, {max(pairs):.2f}]" if pairs else ""
        rss = max(r["peak_rss_mb"] for r in done)
        print(f"  {method:<14}{step:>9.3f}{epoch:>11.3f}{seconds:>9.3f}{ratio:>7}{pair:>9}  {spread:<13}{rss:>11.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
