"""Seconds per training iteration: `uniform` against `l2w` with each meta-gradient mode, and peak memory.

    .venv/bin/python benchmarks/l2w_speed.py                      # msdnet-cifar-budget, batch 64 and 128
    .venv/bin/python benchmarks/l2w_speed.py --backbone tiny --batch 32 --iters 3

The issue's setting: 2 torch threads, random 32x32 inputs, 100 classes, meta_interval 1, SGD (momentum
0.9, weight decay 1e-4). One iteration of l2w is both halves (two backbone steps and two meta steps).
Reference figures on this kind of machine (L2W-DEN's train(), a fresh network copy per meta step):
1.79 s vs 0.30 s uniform at batch 64 (5.9x), 3.14 s vs 0.62 s at batch 128 (5.0x), ~1.4 GB peak RSS.
Goal: <= 3.5x uniform at batch 64 with exact or jvp, peak RSS no higher than the reference's.

Each (method, batch) runs in a fresh subprocess so that each peak RSS (getrusage ru_maxrss, which
includes the interpreter and torch, as the reference's figure does) is its own.
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


def child(backbone: str, mode: str, batch: int, iters: int, warmup: int, threads: int, classes: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from bench.registry import BACKBONES, METHODS, load_all

    load_all()
    torch.manual_seed(0)
    model = BACKBONES.build(backbone, {}, num_classes=classes, in_channels=3, image_size=32)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    if mode == "uniform":
        strategy = METHODS.build("uniform", {}, model=model, optimizer=optimizer, total_steps=iters + warmup)
    else:
        strategy = METHODS.build("l2w", {"meta_grad": mode, "meta_interval": 1}, model=model, optimizer=optimizer,
                                 total_steps=iters + warmup)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(2)]
    times, cpu = [], []
    for it in range(warmup + iters):
        x, y = data[it % 2]
        t0, c0 = time.perf_counter(), time.process_time()
        strategy.step(x, y, it)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append((time.process_time() - c0) / threads)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"mode": mode, "batch": batch, "median_s": statistics.median(times), "min_s": min(times),
            "cpu_s": min(cpu), "peak_rss_mb": rss_mb}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="msdnet-cifar-budget")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.backbone, args.modes[0], args.batch[0], args.iters, args.warmup, args.threads,
                               args.classes)))
        return

    print(f"backbone {args.backbone}, {args.threads} threads, {args.classes} classes, 32x32, meta_interval 1, "
          f"{args.iters} timed iterations after {args.warmup} warm-up")
    print("s/iter: median wall seconds; min: fastest wall; x uniform: min over uniform's min; cpu s/thr: fastest "
          "iteration's process CPU seconds / threads (less sensitive to other load on a shared machine)")
    for batch in args.batch:
        rows = {}
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", "--backbone", args.backbone, "--modes", mode, "--batch",
                   str(batch), "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads",
                   str(args.threads), "--classes", str(args.classes)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"  {mode}: failed\n{out.stderr[-2000:]}")
                continue
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        base = rows.get("uniform")
        print(f"\nbatch {batch}")
        print(f"  {'method':<22}{'s/iter':>9}{'min':>9}{'x uniform':>11}{'cpu s/thr':>11}{'x uniform':>11}"
              f"{'peak RSS MB':>13}")
        for mode, r in rows.items():
            name = "uniform" if mode == "uniform" else f"l2w {mode}"
            ratio = f"{r['min_s'] / base['min_s']:.2f}" if base else "-"
            cpu_ratio = f"{r['cpu_s'] / base['cpu_s']:.2f}" if base else "-"
            print(f"  {name:<22}{r['median_s']:>9.3f}{r['min_s']:>9.3f}{ratio:>11}{r['cpu_s']:>11.3f}{cpu_ratio:>11}"
                  f"{r['peak_rss_mb']:>13.0f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
