"""Seconds per training iteration: `uniform` against `l2w` with each meta-gradient mode, and peak memory.

    .venv/bin/python benchmarks/l2w_speed.py                      # msdnet-cifar-budget, batch 64 and 128
    .venv/bin/python benchmarks/l2w_speed.py --batch 64 --modes uniform jvp --repeats 5

The issue's setting: 2 torch threads, random 32x32 inputs, 100 classes, meta_interval 1, SGD (lr 0.1,
momentum 0.9, weight decay 1e-4). One l2w iteration is both halves (two backbone steps, two meta steps).
Reference figures on this kind of machine (L2W-DEN's train(), a fresh network copy per meta step):
1.79 s vs 0.30 s uniform at batch 64 (5.9x), 3.14 s vs 0.62 s at batch 128 (5.0x), ~1.4 GB peak RSS.
Goal: <= 3.5x uniform at batch 64 with exact or jvp, peak RSS no higher than the reference's.

Protocol: every method runs alone in a fresh process, as a training run would (methods sharing a process
change each other's speed through the allocator by 10-20 %). The processes alternate, method after method,
for --repeats repetitions, so drift in the machine's speed falls on all methods alike. A process times
--rounds iterations after --warmup and reports its fastest, and its peak RSS (getrusage ru_maxrss, which
includes the interpreter and torch, as the reference's figure does). Printed per method: the median over
repetitions of the fastest iteration, its ratio to uniform's, the median of the ratios within a repetition
(adjacent processes), the range of those ratios, and the largest peak RSS.
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


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    strategy = build(args.backbone, args.mode, args.classes, args.warmup + args.rounds)
    data = batches(args.batch, args.classes)
    wall = []
    for it in range(args.warmup + args.rounds):
        x, y = data[it % 2]
        t0 = time.perf_counter()
        strategy.step(x, y, it)
        if it >= args.warmup:
            wall.append(time.perf_counter() - t0)
    return {"min_s": min(wall), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(args, mode: str, batch: int) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--backbone", args.backbone, "--batch", str(batch),
           "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--classes", str(args.classes)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  the run of {mode} failed:\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, no usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def at_least(low: int):
    """argparse type: an integer >= low (one line and exit 2 otherwise)."""
    def parse(text: str) -> int:
        value = int(text) if text.lstrip("-").isdigit() else None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> None:
    ap = OneLineErrors(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="msdnet-cifar-budget")
    ap.add_argument("--batch", type=at_least(2), nargs="+", default=[64, 128])
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--repeats", type=at_least(1), default=3, help="fresh processes per method, alternated")
    ap.add_argument("--rounds", type=at_least(1), default=3, help="timed iterations per process")
    ap.add_argument("--warmup", type=at_least(0), default=1)
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--classes", type=at_least(2), default=100)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.batch = args.batch[0]
        print(json.dumps(child(args)))
        return
    from bench.registry import BACKBONES, load_all

    load_all()
    if args.backbone not in BACKBONES:
        ap.error(f"--backbone {args.backbone!r} is not registered; one of {', '.join(BACKBONES.all_names())}")

    print(f"backbone {args.backbone}, {args.threads} threads, {args.classes} classes, 32x32 random inputs, "
          f"meta_interval 1; {args.repeats} alternated processes per method, each the fastest of {args.rounds} "
          f"iterations after {args.warmup} warm-up")
    for batch in args.batch:
        runs: dict[str, list[dict | None]] = {m: [] for m in args.modes}
        for _ in range(args.repeats):
            for mode in args.modes:
                runs[mode].append(run_child(args, mode, batch))
        base = runs.get("uniform")
        print(f"\nbatch {batch}  (s: median over processes of the fastest iteration; x: its ratio to uniform's; "
              f"x/pair: median [range] of the ratios to the adjacent uniform process)")
        print(f"  {'method':<22}{'s/iter':>9}{'x':>7}{'x/pair':>9}  {'range':<13}{'peak RSS MB':>11}")
        uniform_s = statistics.median(r["min_s"] for r in base if r) if base and any(base) else None
        for mode, results in runs.items():
            done = [r for r in results if r]
            if not done:
                continue
            seconds = statistics.median(r["min_s"] for r in done)
            name = "uniform" if mode == "uniform" else f"l2w {mode}"
            ratio = f"{seconds / uniform_s:.2f}" if uniform_s else "-"
            pairs = [r["min_s"] / u["min_s"] for r, u in zip(results, base or []) if r and u]
            pair = f"{statistics.median(pairs):.2f}" if pairs else "-"
            spread = f"[{min(pairs):.2f}, {max(pairs):.2f}]" if pairs else ""
            rss = max(r["peak_rss_mb"] for r in done)
            print(f"  {name:<22}{seconds:>9.3f}{ratio:>7}{pair:>9}  {spread:<13}{rss:>11.0f}")
        sys.stdout.flush()

if __name__ == "__main__":
    main()
