"""Evaluation speed of one trial's model (what `exitbench train` does after its epochs, and `exitbench evaluate`):
the calibration and test splits through every exit, one batch at a time on torch's thread team (before) vs the
batches spread over single-threaded workers (bench.evaluate.batches, after); wall and CPU seconds, images/s, and
whether the logits are the same bits.

    python benchmarks/eval_speed.py [k=v ...] [--threads N] [--batches N]

The trial defaults to issue 29's: data.name=fashion-mnist data.train_subset=500 backbone=msdnet-fmnist (6,000
held-out calibration images, 10,000 test images, 11.25 M MACs); the model keeps its seeded initialisation
(speed does not depend on the weights). `--threads`: torch's threads (default: torch's, all cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT = ["data.name=fashion-mnist", "data.train_subset=500", "backbone=msdnet-fmnist", "method=uniform"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, no usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _before(model, loader, limit):
    """The loop bench.evaluate.logits.collect_exits ran before: one batch at a time, torch's own threads."""
    import torch

    parts = []
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i == limit:
                break
            parts.append(torch.stack([z.float() for z in model(x)]))
    return torch.cat(parts, 1)


def _accuracy_before(model, loader) -> list[float]:
    """bench.trial.train.exit_accuracy as it was: top-1 % of every exit, one batch at a time."""
    import torch

    correct, total = None, 0
    with torch.no_grad():
        for x, y in loader:
            hits = torch.stack([(z.argmax(1) == y).sum() for z in model(x)])
            correct = hits if correct is None else correct + hits
            total += y.numel()
    return [100.0 * float(c) / max(total, 1) for c in correct]


def _after(model, loader, limit):
    import itertools

    import torch

    from bench.evaluate.batches import map_batches

    head = itertools.islice(loader, limit)
    return torch.cat(list(map_batches(lambda x, y: torch.stack([z.float() for z in model(x)]), head, "cpu")), 1)


def _timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="k=v", help="trial overrides (default: issue 29's trial)")
    parser.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batches", type=_positive, default=None, help="only the first N batches of each split")
    args = parser.parse_args()

    import torch

    from bench import backbones, datasets
    from bench.config import load_trial
    from bench.errors import UsageError

    try:
        cfg = load_trial(None, [*DEFAULT, *args.overrides])
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(cfg.seed)
        bundle = datasets.build(cfg.data, cfg.batch_size, seed=cfg.seed)
    except UsageError as err:
        parser.error(str(err))
    model = backbones.build(cfg.backbone, bundle.num_classes, bundle.in_channels, bundle.image_size).eval()
    print(f"{cfg.data['name']} x {cfg.backbone['name']}, batch {cfg.batch_size}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    for split, loader in (("calibration", bundle.calib), ("test", bundle.test)):
        _before(model, [next(iter(loader))], 1)  # warm-up: the first batch allocates and picks kernels
        old, wall_old, cpu_old = _timed(_before, model, loader, args.batches)
        new, wall_new, cpu_new = _timed(_after, model, loader, args.batches)
        n = old.shape[1]
        _line(split, n, wall_old, cpu_old, wall_new, cpu_new, f"same bits: {torch.equal(old, new)}")
    # the trial loop's per-epoch val accuracy: its loop (one batch at a time) vs bench.evaluate.batches'
    import itertools

    from bench.evaluate.batches import exit_accuracy

    val = list(itertools.islice(bundle.val, args.batches))
    old, wall_old, cpu_old = _timed(_accuracy_before, model, val)
    new, wall_new, cpu_new = _timed(exit_accuracy, model, val, "cpu")
    _line("val accuracy", sum(len(y) for _, y in val), wall_old, cpu_old, wall_new, cpu_new,
          f"same numbers: {old == new}")


def _line(what, n, wall_old, cpu_old, wall_new, cpu_new, check) -> None:
    print(f"{what:<12} {n:>6} images  before: wall {wall_old:7.2f} s  cpu {cpu_old:7.2f} s  "
          f"{n / wall_old:7.0f} images/s   after: wall {wall_new:7.2f} s  cpu {cpu_new:7.2f} s  "
          f"{n / wall_new:7.0f} images/s   ({wall_old / wall_new:.1f}x)  {check}")


if __name__ == "__main__":
    main()
