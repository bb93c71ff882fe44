"""Backbone training speed: forward + backward images/s of every registered CIFAR-size backbone preset.

For each preset (msdnet-cifar-*, ranet-cifar*, sdn-cifar-*, tiny; those not registered are skipped) at
batch 64, 32x32 inputs, 100 classes, train mode: the loss is the sum of the exits' cross-entropies, as
the `uniform` strategy trains them. Also prints eval-mode inference (forward, all exits, no grad).
Warm-up iterations first; the figure is batch / median time of the timed iterations.
On a box shared with other jobs, compare with --threads 1: torch's OpenMP threads spin at every op
boundary, so oversubscribed cores slow these many-small-op networks by up to an order of magnitude.
Run: .venv/bin/python benchmarks/backbone_speed.py [--iters 5] [--warmup 2] [--threads N] [names...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.registry import BACKBONES, load_all  # noqa: E402

CIFAR_PREFIXES = ("msdnet-cifar", "ranet-cifar", "sdn-cifar", "tiny")


def median_seconds(step, warmup: int, iters: int, device: torch.device) -> float:
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, args, device: torch.device) -> tuple[float, float]:
    """Median seconds of one train step (forward + backward of the summed exit losses) and one eval forward."""
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def train_step():
        model.zero_grad(set_to_none=True)
        sum(F.cross_entropy(o, y) for o in model(x)).backward()

    def eval_step():
        with torch.no_grad():
            model(x)

    model.train()
    train = median_seconds(train_step, args.warmup, args.iters, device)
    model.eval()
    return train, median_seconds(eval_step, args.warmup, args.iters, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="backbones or presets (default: every CIFAR preset registered)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    load_all()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.names or [n for n in BACKBONES.all_names() if n.startswith(CIFAR_PREFIXES)]
    missing = [p for p in CIFAR_PREFIXES if not any(n.startswith(p) for n in BACKBONES.all_names())]
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, {args.num_classes} classes, median of {args.iters} after "
          f"{args.warmup} warm-up" + (f"; not registered: {', '.join(missing)}" if missing else ""))
    print(f"{'backbone':<22} {'exits':>5} {'params':>8} {'train fwd+bwd img/s':>20} {'eval fwd img/s':>15}")

    for name in names:
        torch.manual_seed(0)
        model = BACKBONES.build(name, {}, num_classes=args.num_classes, in_channels=3,
                                image_size=args.image_size).to(device)
        train, infer = measure(model, args, device)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<22} {model.num_exits:>5} {params / 1e6:>7.2f}M {args.batch_size / train:>20,.0f} "
              f"{args.batch_size / infer:>15,.0f}", flush=True)

if __name__ == "__main__":
    main()
