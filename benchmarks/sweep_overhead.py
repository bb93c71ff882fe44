"""Sweep overhead and parallel throughput on Ray Tune (issue 7 targets: overhead < 3 s per trial; 2 concurrent
1-CPU trials >= 1.6x the throughput of one at a time on a 2-CPU machine).

    .venv/bin/python benchmarks/sweep_overhead.py [--trials 6] [--train-size 6000] [--epochs 2] [--repeat 2]

One local Ray (sized to --cpus) is started once and timed on its own. Then the same trials run twice:
one at a time (max_concurrent 1) and side by side (max_concurrent = cpus). Overhead per trial is the
sequential sweep's wall time minus the trials' own wall time (the engine's, from data build to evaluation,
as stored in the results store), divided by the number of trials: what Tune adds (actor start, imports,
reporting, checkpoint copies, store writes). Throughput is trials per second of sweep wall time. The
control runs the same trials in plain processes without Ray, to show what parallelism the machine itself
gives torch trials now: on the shared 2-vCPU development VM that is well under 2x (often under 1.6x) even
without Ray, so compare Ray's speed-up with the control's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def sweep_config(name: str, storage: str, trials: int, train_size: int, epochs: int, concurrent: int):
    from bench.config import validate_sweep

    base = {
        "data": {"name": "synthetic", "num_classes": 10, "image_size": 16, "train_size": train_size,
                 "test_size": 500, "val_size": 0.1},
        "backbone": {"name": "tiny", "widths": [8, 16, 32]},
        "epochs": epochs, "batch_size": 64, "device": "cpu",
    }
    return validate_sweep({"name": name, "base": base, "seeds": list(range(trials)), "resources": {"cpu": 1},
                           "max_concurrent": concurrent, "storage_path": storage})


def timed_sweep(sweep) -> tuple[float, float]:
    """(sweep wall time, summed trial wall time) in seconds."""
    from bench import results
    from bench.sweep.driver import run_sweep

    t0 = time.perf_counter()
    outcome = run_sweep(sweep, quiet=True)
    wall = time.perf_counter() - t0
    if outcome.failed or outcome.finished != outcome.trials:
        raise SystemExit(f"sweep {sweep.name}: {outcome}")
    runs = results.load(outcome.sweep_dir).runs
    return wall, float(runs["wall_time_s"].sum())


def plain_trial(args: tuple[dict, str]) -> float:
    """One trial in a plain process (no Ray), 1 torch thread: the control for the machine's own parallelism."""
    import torch

    from bench.config import validate_trial
    from bench.trial import train

    raw, out = args
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train.run(validate_trial(raw), out)
    return time.perf_counter() - t0


def plain_pool(sweep, workers: int, folder: str) -> float:
    """Wall time of the sweep's trials in a pool of `workers` plain processes (started before timing)."""
    import multiprocessing as mp

    jobs = [(dict(t.model_dump(), progress=False), f"{folder}/{workers}-{i}") for i, t in enumerate(sweep.trials())]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(time.sleep, [0.0] * workers)  # workers are up before the clock starts
        t0 = time.perf_counter()
        pool.map(plain_trial, jobs, chunksize=1)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="rounds of each mode (the best counts)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the same trials in plain processes (the machine's own parallel speed-up)")
    args = p.parse_args()

    t0 = time.perf_counter()
    import ray

    import bench.sweep.driver  # noqa: F401  (ray.tune and torch, as the CLI imports them)

    imports = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_start = time.perf_counter() - t0
    print(f"imports {imports:.2f} s, ray.init ({args.cpus} CPUs) {ray_start:.2f} s")
    seq_runs, par_runs, plain_seq, plain_par = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="exitbench-bench-") as storage:
        for r in range(args.repeat):  # interleave the modes (other load comes and goes); the best of each counts
            seq = sweep_config(f"sequential{r}", storage, args.trials, args.train_size, args.epochs, 1)
            par = sweep_config(f"parallel{r}", storage, args.trials, args.train_size, args.epochs, args.cpus)
            seq_runs.append(timed_sweep(seq))
            par_runs.append(timed_sweep(par))
            if args.control:  # Ray stays up but idle
                plain_seq.append(plain_pool(seq, 1, f"{storage}/plain{r}"))
                plain_par.append(plain_pool(seq, args.cpus, f"{storage}/plain{r}"))
            print(f"round {r + 1}: Ray {seq_runs[-1][0]:.1f} s -> {par_runs[-1][0]:.1f} s"
                  + (f", plain {plain_seq[-1]:.1f} s -> {plain_par[-1]:.1f} s" if args.control else ""), flush=True)
        ray.shutdown()

    n = args.trials
    seq_wall, seq_trials = min(seq_runs)
    par_wall, par_trials = min(par_runs)
    overhead = (seq_wall - seq_trials) / n
    speedup = seq_wall / par_wall
    print(f"{n} trials x {args.epochs} epochs ({args.train_size} images, tiny [8,16,32], 1 CPU each), best of "
          f"{args.repeat}")
    print(f"one at a time:   wall {seq_wall:6.1f} s, trials' own time {seq_trials:6.1f} s "
          f"({seq_trials / n:.1f} s per trial)   all walls: {', '.join(f'{w:.1f}' for w, _ in seq_runs)}")
    print(f"{args.cpus} side by side: wall {par_wall:6.1f} s, trials' own time {par_trials:6.1f} s "
          f"({par_trials / n:.1f} s per trial)   all walls: {', '.join(f'{w:.1f}' for w, _ in par_runs)}")
    print(f"overhead per trial (sequential wall - trials' time) / trials: {overhead:.2f} s   (target < 3 s)")
    print(f"with the Ray start counted in: {(seq_wall - seq_trials + ray_start) / n:.2f} s per trial")
    print(f"throughput: {n / seq_wall:.3f} -> {n / par_wall:.3f} trials/s = {speedup:.2f}x   (target >= 1.6x)")
    if args.control:  # what the machine itself gives two torch processes (no Ray at all)
        machine = min(plain_seq) / min(plain_par)
        print(f"control, plain processes without Ray: one at a time {min(plain_seq):.1f} s, {args.cpus} side by side "
              f"{min(plain_par):.1f} s = {machine:.2f}x; Ray keeps {100 * speedup / machine:.0f} % of it")

if __name__ == "__main__":
    main()
