"""Seconds per training iteration: `uniform` against `l2w` with each meta-gradient mode, and peak memory.

    .venv/bin/python benchmarks/l2w_speed.py                      # msdnet-cifar-budget, batch 64 and 128
    .venv/bin/python benchmarks/l2w_speed.py --backbone tiny --batch 32 --rounds 3

The issue's setting: 2 torch threads, random 32x32 inputs, 100 classes, meta_interval 1, SGD (lr 0.1,
momentum 0.9, weight decay 1e-4). One l2w iteration is both halves (two backbone steps, two meta steps).
Reference figures on this kind of machine (L2W-DEN's train(), a fresh network copy per meta step):
1.79 s vs 0.30 s uniform at batch 64 (5.9x), 3.14 s vs 0.62 s at batch 128 (5.0x), ~1.4 GB peak RSS.
Goal: <= 3.5x uniform at batch 64 with exact or jvp, peak RSS no higher than the reference's.

Timing: one process holds every method (each its own copy of the same initial network) and steps them in
turn, one iteration each per round, so load from other processes on a shared machine falls on all of them
alike; the figure is the fastest round (min), the median is printed too. Wall and process-CPU seconds are
both reported: CPU time / threads is less sensitive to other load, but includes OpenMP spin-waiting.
Memory: each method runs alone in a fresh process (peak RSS = getrusage ru_maxrss, which includes the
interpreter and torch, as the reference's figure does).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ["uniform", "exact", "jvp", "finite_difference"]


def build(backbone: str, mode: str, classes: int, total_steps: int):
    import torch

    from bench.registry import BACKBONES, METHODS, load_all

    load_all()
    torch.manual_seed(0)
    model = BACKBONES.build(backbone, {}, num_classes=classes, in_channels=3, image_size=32)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    if mode == "uniform":
        return METHODS.build("uniform", {}, model=model, optimizer=optimizer, total_steps=total_steps)
    return METHODS.build("l2w", {"meta_grad": mode, "meta_interval": 1}, model=model, optimizer=optimizer,
                         total_steps=total_steps)


def batches(batch: int, classes: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(2)]


def child_time(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    rounds = args.warmup + args.rounds
    strategies = {mode: build(args.backbone, mode, args.classes, rounds) for mode in args.modes}
    data = batches(args.batch[0], args.classes)
    wall: dict[str, list[float]] = {m: [] for m in args.modes}
    cpu: dict[str, list[float]] = {m: [] for m in args.modes}
    for it in range(rounds):
        x, y = data[it % 2]
        for mode, strategy in strategies.items():
            t0, c0 = time.perf_counter(), time.process_time()
            strategy.step(x, y, it)
            if it >= args.warmup:
                wall[mode].append(time.perf_counter() - t0)
                cpu[mode].append((time.process_time() - c0) / args.threads)
    return {m: {"min_s": min(wall[m]), "median_s": statistics.median(wall[m]), "cpu_s": min(cpu[m])}
            for m in args.modes}


def child_memory(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    strategy = build(args.backbone, args.modes[0], args.classes, 2)
    for it, (x, y) in enumerate(batches(args.batch[0], args.classes)):
        strategy.step(x, y, it)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def run_child(args, kind: str, modes: list[str], batch: int) -> dict | None:
    cmd = [sys.executable, __file__, f"--child-{kind}", "--backbone", args.backbone, "--modes", *modes, "--batch",
           str(batch), "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--classes", str(args.classes)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  {kind} run of {' '.join(modes)} failed:\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="msdnet-cifar-budget")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--rounds", type=int, default=5, help="timed iterations per method")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method peak-RSS runs")
    ap.add_argument("--child-time", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_time or args.child_memory:
        print(json.dumps(child_time(args) if args.child_time else child_memory(args)))
        return

    print(f"backbone {args.backbone}, {args.threads} threads, {args.classes} classes, 32x32 random inputs, "
          f"meta_interval 1; {args.rounds} interleaved rounds after {args.warmup} warm-up")
    for batch in args.batch:
        times = run_child(args, "time", args.modes, batch)
        if times is None:
            continue
        memory = {} if args.no_memory else {m: run_child(args, "memory", [m], batch) for m in args.modes}
        base = times.get("uniform")
        print(f"\nbatch {batch}  (s/iteration: fastest round; x: ratio to uniform)")
        print(f"  {'method':<22}{'wall s':>9}{'x':>7}{'median':>9}{'cpu s/thr':>11}{'x':>7}{'peak RSS MB':>13}")
        for mode, t in times.items():
            name = "uniform" if mode == "uniform" else f"l2w {mode}"
            ratio = f"{t['min_s'] / base['min_s']:.2f}" if base else "-"
            cpu_ratio = f"{t['cpu_s'] / base['cpu_s']:.2f}" if base else "-"
            rss = (memory.get(mode) or {}).get("peak_rss_mb")
            rss_text = f"{rss:.0f}" if rss else "-"
            print(f"  {name:<22}{t['min_s']:>9.3f}{ratio:>7}{t['median_s']:>9.3f}{t['cpu_s']:>11.3f}{cpu_ratio:>7}"
                  f"{rss_text:>13}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
