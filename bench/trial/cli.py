"""`exitbench train`: one trial without Ray, or with `workers.count > 1` its DDP worker group on a local Ray."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.config import load_trial, split_config_arg
from bench.errors import UsageError, check_output_dir
from bench.runfolder import CHECKPOINT
from bench.trial.files import check_resumable, load_checkpoint
from bench.trial.train import TrainingDiverged, run


def cli_train(args) -> int:
    cfg = load_trial(*split_config_arg(args.config, args.overrides))
    run_dir = Path(cfg.out_dir)
    check_output_dir(run_dir, f"out_dir={cfg.out_dir}")
    if (run_dir / CHECKPOINT).exists() and not args.resume:
        raise UsageError(f"run folder {str(run_dir)!r} already holds a checkpoint; pass --resume to continue it "
                         f"or choose another out_dir=...")
    if args.resume and not (run_dir / CHECKPOINT).exists():
        raise UsageError(f"--resume: no checkpoint in {str(run_dir)!r} to continue")
    if args.resume:  # before any data or model is built: a foreign file is one line
        check_resumable(load_checkpoint(run_dir / CHECKPOINT), run_dir / CHECKPOINT)
    try:
        if cfg.workers.count > 1:  # one trial on several workers: Ray Train's DDP group (bench/trial/distributed.py)
            from bench.trial import distributed

            record = distributed.train(cfg, run_dir, resume=args.resume)
        else:
            record = run(cfg, run_dir, resume=args.resume)
    except TrainingDiverged as err:
        print(f"exitbench: training diverged: {err}", file=sys.stderr, flush=True)
        return 1
    last = record.exits[-1]
    print(f"run folder: {run_dir}")
    readout = f", readout {last['readout_macs']:,.0f} of them" if last.get("readout_macs") else ""
    print(f"last exit: top-1 {last['top1']:.2f} %  MACs {last['macs'] / 1e6:.3f} M{readout}  ({record.counter})")
    s = record.summary
    if "auc" in s:
        print(f"budgeted: AUC {s['auc']:.4f}  best of the 39 budgets {s.get('best_acc', float('nan')):.2f} %")
    print(f"wall time {record.wall_time_s:.1f} s, {record.train_images_per_s:.0f} train images/s")
    return 0
