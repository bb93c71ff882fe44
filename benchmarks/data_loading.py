"""Data loading speed: our transforms and loaders against the torchvision pipelines the references use.

Writes fake CIFAR batches and a fake ImageNet folder (JPEG, ~500x375) to a temp dir and prints:
  - microseconds per training sample (CIFAR augmentation) for bench.datasets vs torchvision v1 / v2 transforms,
  - loader images/s (train and eval transforms) for workers 0 and 2,
  - ImageNet-folder images/s for bench.datasets vs torchvision ImageFolder with the same transforms,
  - bytes the file list costs per image (numpy byte array vs ImageFolder's list of tuples).
Run: .venv/bin/python benchmarks/data_loading.py [--cifar-images 10000] [--folder-images 256]

With --trial SWEEP.yaml it instead profiles one trial of that sweep (its base config, --method, --threads): the
share of each training step spent waiting for the loader, measured around the same loop `bench.trial.train` runs
(loader -> strategy.step), e.g. results/fashion-mnist/sweep.yaml, whose goal is < 10 %.
"""

from __future__ import annotations

import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from l2w_speed import OneLineErrors, at_least  # noqa: E402  (the benchmarks' one-line argument errors)

from bench import datasets  # noqa: E402
from bench.datasets.splits import seed_worker  # noqa: E402


def per_sample_us(fn, items, repeat=1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        for item in items:
            fn(item)
    return (time.perf_counter() - t0) / (repeat * len(items)) * 1e6


def loader_rate(dataset, workers: int, batch_size: int, max_batches: int | None = None) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), worker_init_fn=seed_worker)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0, seen = time.perf_counter(), 0
    for i, (x, _) in enumerate(it):
        seen += len(x)
        if max_batches and i + 1 >= max_batches:
            break
    return seen / (time.perf_counter() - t0)


def trial_profile(path: str, method: str, threads: int, steps: int) -> None:
    """Seconds per training step spent in the loader (next batch) and in the strategy's step, for one trial."""
    from bench.config import load_sweep, validate_trial
    from bench.trial.train import build_trial

    sweep = load_sweep(path)
    cfg = validate_trial({**sweep.base.model_dump(mode="json"), "method": {"name": method}, "threads": threads,
                          "seed": 0, "amp": False})
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    trial = build_trial(cfg, torch.device("cpu"))
    bundle, strategy, steps_per_epoch = trial.bundle, trial.strategy, trial.steps_per_epoch
    trial.regime.begin_epoch(0, trial.model, trial.optimizer)
    waits, computes = [], []
    batches = iter(bundle.train)
    for i in range(min(steps + 3, steps_per_epoch)):
        t0 = time.perf_counter()
        x, y = next(batches)
        t1 = time.perf_counter()
        strategy.step(x, y, i)
        t2 = time.perf_counter()
        if i >= 3:  # the first steps warm caches and allocators
            waits.append(t1 - t0)
            computes.append(t2 - t1)
    wait, compute = float(np.mean(waits)), float(np.mean(computes))
    print(f"{path}: {cfg.data['name']} x {cfg.backbone['name']} x {method}, batch {cfg.batch_size}, "
          f"{cfg.data.get('workers', 0)} loader workers, {threads} thread(s), {len(waits)} steps")
    print(f"per step: loader {wait * 1000:.1f} ms | step {compute * 1000:.1f} ms | loader share "
          f"{100 * wait / (wait + compute):.1f} % of the step time (goal < 10 %)")


def main() -> None:
    ap = OneLineErrors(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar-images", type=int, default=10000)
    ap.add_argument("--folder-images", type=int, default=256)
    ap.add_argument("--trial", metavar="SWEEP_YAML", help="profile one trial of this sweep instead")
    ap.add_argument("--method", default="uniform", help="with --trial: the strategy (default uniform)")
    ap.add_argument("--threads", type=at_least(1), default=1,
                    help="with --trial: torch threads (default 1, as the sweeps)")
    ap.add_argument("--steps", type=at_least(1), default=60, help="with --trial: measured steps (default 60)")
    args = ap.parse_args()
    if args.trial:
        from bench.errors import ConfigError, UsageError

        try:
            trial_profile(args.trial, args.method, args.threads, args.steps)
        except (ConfigError, UsageError) as err:
            ap.error(f"--trial {args.trial}: {err}")
        return
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "cifar-10-batches-py"
        folder.mkdir()
        per = args.cifar_images // 5
        for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(folder / f, "wb") as fh:
                pickle.dump({"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
                             "labels": rng.integers(0, 10, per).tolist()}, fh)
        s = datasets.make_splits({"name": "cifar10", "root": str(root), "val_size": 0.1})[2]
        view = s.train.dataset
        idx = list(range(2000))
        ours = per_sample_us(lambda i: view[i], idx)

        from torchvision import transforms as T
        from torchvision.transforms import v2

        mean, std = datasets.CIFAR_MEAN_STD["cifar10"]
        v1 = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        hwc = view.images.transpose(0, 2, 3, 1)
        ref_v1 = per_sample_us(lambda i: v1(Image.fromarray(hwc[i])), idx)
        tv2 = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                          v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        chw = torch.from_numpy(view.images)
        ref_v2 = per_sample_us(lambda i: tv2(chw[i]), idx)
        print(f"CIFAR train transform per sample: bench.datasets {ours:.1f} us | torchvision v1 (PIL, MSDNet's) "
              f"{ref_v1:.1f} us | torchvision v2 (tensor) {ref_v2:.1f} us")
        for workers in (0, 2):
            tr = loader_rate(s.train, workers, 128)
            ev = loader_rate(s.val.dataset, workers, 128)
            print(f"CIFAR loader, {workers} workers, batch 128: train {tr:,.0f} img/s | eval {ev:,.0f} img/s")

        # ImageNet-style folder of JPEGs of typical size.
        classes = 4
        for c in range(classes):
            (root / "in" / "train" / f"c{c}").mkdir(parents=True)
            (root / "in" / "val" / f"c{c}").mkdir(parents=True)
        for i in range(args.folder_images):
            img = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
            img.save(root / "in" / "train" / f"c{i % classes}" / f"{i}.JPEG", quality=90)
            if i < classes:
                img.save(root / "in" / "val" / f"c{i}" / f"{i}.JPEG", quality=90)
        t0 = time.perf_counter()
        s = datasets.make_splits({"name": "imagenet", "root": str(root / "in"), "val_size": 4})[2]
        scan = time.perf_counter() - t0
        import torchvision

        normalize = T.Normalize(*datasets.IMAGENET_MEAN_STD)
        ref_train = torchvision.datasets.ImageFolder(str(root / "in" / "train"), T.Compose(
            [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize]))
        ref_eval = torchvision.datasets.ImageFolder(str(root / "in" / "train"), T.Compose(
            [T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize]))
        print(f"ImageNet folder: {args.folder_images} JPEGs 500x375, split built in {scan:.2f} s (one scan, two views)")
        for workers in (0, 2):
            rates = [loader_rate(d, workers, 32) for d in (s.train.dataset, ref_train, s.val.dataset, ref_eval)]
            print(f"ImageNet loader, {workers} workers, bs 32: train bench.datasets {rates[0]:,.0f} img/s vs "
                  f"ImageFolder {rates[1]:,.0f} | eval bench.datasets {rates[2]:,.0f} vs ImageFolder {rates[3]:,.0f}")

    # What the file list costs per image in each worker (ImageNet-like paths).
    n = 100_000
    paths = [f"n{1000000 + i % 1000:08d}/n{1000000 + i % 1000:08d}_{i}.JPEG" for i in range(n)]
    as_numpy = np.array([p.encode() for p in paths]).nbytes + n * 8
    as_tuples = sum(sys.getsizeof(p) + sys.getsizeof((p, 0)) + 8 for p in paths) + sys.getsizeof([None] * n)
    print(f"file list per image: numpy bytes array {as_numpy / n:.0f} B (no refcounts: stays shared across forked "
          f"workers) | list of (path, label) tuples {as_tuples / n:.0f} B (refcount writes copy it per worker)")


if __name__ == "__main__":
    main()
