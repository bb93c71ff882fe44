"""Training throughput of one trial on 1 vs several DDP workers (images/s), as bench.trial.distributed runs them.

    .venv/bin/python benchmarks/ddp_scaling.py                         # msdnet-cifar-budget, batch 64, 1 and 2 workers
    .venv/bin/python benchmarks/ddp_scaling.py --workers 1 2 4 --device cuda --batch 256 --figure scaling.png

Each setting runs in fresh processes (torch.multiprocessing, gloo on CPU, nccl on CUDA): every worker builds the
backbone and the strategy as a trial does, joins the group through `bench.trial.workers.Workers` (DDP, its share
of the global batch), runs --warmup steps, then times --steps steps of random inputs (32x32, 100 classes). The
throughput is the global batch x steps over the slowest rank's time. Also measured: one process with as many
threads as the workers have together (what a one-process trial would use on the same cores). Printed: a table
of images/s and the speed-up over one worker; --figure also draws it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from l2w_speed import OneLineErrors, at_least  # noqa: E402  (the benchmarks' one-line argument errors)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, size: int, port: int, args, out: str) -> None:
    import torch
    import torch.distributed as dist

    from bench.config import validate_trial
    from bench.readout import build_readout
    from bench.registry import BACKBONES, METHODS, load_all
    from bench.trial.workers import Workers

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if size > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    load_all()
    torch.manual_seed(0)
    model = BACKBONES.build(args.backbone, {}, num_classes=100, in_channels=3, image_size=32).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    total = args.warmup + args.steps
    readout = build_readout({"name": args.method}, model.num_exits, 100).to(device)  # ztw's, boosted's
    # the steps as 10 epochs of a trial (ztw's last one fits its ensembles; epoch-end passes are not timed)
    strategy = METHODS.build(args.method, {}, model=model, optimizer=optimizer, total_steps=total, device=device,
                             steps_per_epoch=max(1, total // 10), readout=readout)
    if size > 1:
        cfg = validate_trial({"batch_size": args.batch, "method": args.method, "workers": {"count": size}})
        Workers(cfg, device).wrap(strategy, model)
    share = args.batch // size
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(share, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (share,), generator=g).to(device)
    for i in range(total):
        if i == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            if size > 1:
                dist.barrier()
            start = time.perf_counter()
        strategy.step(x, y, i)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"seconds": seconds}, f)
    if size > 1:
        dist.destroy_process_group()


def measure(size: int, threads: int, args) -> float:
    """Global images/s of `size` workers with `threads` threads each."""
    import torch.multiprocessing as mp

    run = argparse.Namespace(**{**vars(args), "threads": threads})
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(size, _free_port(), run, out), nprocs=size)
        seconds = max(json.load(open(f"{out}/rank{r}.json"))["seconds"] for r in range(size))
    return args.batch * args.steps / seconds


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", nargs="+", type=at_least(1), default=[1, 2], help="worker counts (1 first)")
    parser.add_argument("--backbone", default="msdnet-cifar-budget")
    parser.add_argument("--method", default="uniform")
    parser.add_argument("--batch", type=at_least(1), default=64, help="global batch")
    parser.add_argument("--steps", type=at_least(1), default=10)
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch threads per worker")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--figure", help="also draw the figure to this file (.png, .pdf)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    from bench.registry import BACKBONES, METHODS, load_all

    load_all()

    def fail(message: str) -> int:
        print(f"ddp_scaling.py: error: {message}", file=sys.stderr)
        return 2

    if args.backbone not in BACKBONES:
        return fail(f"--backbone {args.backbone!r} is not registered; one of {', '.join(BACKBONES.all_names())}")
    if args.method not in METHODS:
        return fail(f"--method {args.method!r} is not registered; one of {', '.join(METHODS.all_names())}")
    if args.warmup + args.steps < 2 and args.method == "ztw":
        return fail("--method ztw needs --warmup + --steps >= 2 (a cascade epoch before its ensemble epoch)")
    bad = [n for n in args.workers if args.batch % n]
    if bad:
        return fail(f"--batch {args.batch} does not split evenly over {bad[0]} workers")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < max(args.workers):
            return fail(f"--device cuda with {max(args.workers)} workers needs as many GPUs; "
                        f"{torch.cuda.device_count()} here")
    rows = []
    base = None
    for n in args.workers:
        rate = measure(n, args.threads, args)
        base = base or rate
        rows.append((f"{n} worker{'s' if n > 1 else ''} x {args.threads} thread{'s' if args.threads > 1 else ''}",
                     n, rate))
        if n > 1 and args.device == "cpu":
            rows.append((f"1 process x {n * args.threads} threads", 1, measure(1, n * args.threads, args)))
    print(f"{args.method} on {args.backbone}, global batch {args.batch}, {args.steps} steps, {args.device}")
    print(f"{'setting':<28} {'images/s':>10} {'speed-up':>9}")
    for label, _, rate in rows:
        print(f"{label:<28} {rate:>10.1f} {rate / base:>8.2f}x")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.barh([label for label, _, _ in rows][::-1], [rate for _, _, rate in rows][::-1])
        ax.set_xlabel("training images/s")
        ax.set_title(f"{args.method}, {args.backbone}, batch {args.batch} ({args.device})", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
