"""`exitbench sweep`: start a sweep (a file or a bundled sweep's name) or continue one, print its outcome and,
when the sweep asks for it, its report."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.config import load_sweep, read_yaml, resolve_config
from bench.errors import UsageError
from bench.sweep import driver
from bench.trial.files import is_uri

DEFAULT_SWEEP = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def _print_summary(outcome: driver.Outcome) -> None:
    parts = [f"{outcome.finished} finished", f"{len(outcome.failed)} failed"]
    if outcome.stopped:
        parts.append(f"{outcome.stopped} stopped early by ASHA")
    if outcome.unfinished:
        parts.append(f"{outcome.unfinished} unfinished")
    print(f"sweep: {outcome.trials} trials: {', '.join(parts)}")
    for tid, label, error, trial_dir in outcome.failed:
        print(f"  failed {tid} ({label}): {error}  [traceback: {trial_dir}/error.txt]")
    if outcome.unfinished or outcome.failed:
        print(f"continue (unfinished and failed trials): {driver.resume_command(outcome.sweep_dir)}")
    if outcome.failed:
        lr = outcome.sweep.base.optim.lr / 2
        print(f"or retry them with other settings, e.g. half the learning rate: "
              f"{driver.resume_command(outcome.sweep_dir, f'optim.lr={lr:g}')}")
    print(f"results store: {outcome.sweep_dir}/store (bench.results.load; `exitbench report {outcome.sweep_dir}`)")


def cli_sweep(args) -> int:
    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None  # `sweep key=value ...`: no file
    if args.resume:
        if args.name and args.name != args.resume:
            raise UsageError(f"--name {args.name} and --resume {args.resume} disagree; give only --resume NAME")
        raw = read_yaml(resolve_config(args.config)) if args.config else {}
        changes = [o for o in args.overrides if not o.startswith("storage_path=")]
        storage = raw.get("storage_path", "runs")
        for item in args.overrides:
            if item.startswith("storage_path="):
                storage = item.partition("=")[2] or storage
        outcome = driver.resume_sweep(args.resume, str(storage), address=args.address, quiet=args.quiet,
                               overrides=changes)
    else:
        path = resolve_config(args.config) if args.config else None
        if path is None:
            if not DEFAULT_SWEEP.is_file():
                raise UsageError(f"no sweep file given and the bundled default sweep {DEFAULT_SWEEP} does not exist; "
                                 f"pass SWEEP.yaml")
            path = DEFAULT_SWEEP
        sweep = load_sweep(path, args.overrides)
        if args.name:
            sweep = sweep.model_copy(update={"name": args.name})
        outcome = driver.run_sweep(sweep, address=args.address, quiet=args.quiet)
    _print_summary(outcome)
    sweep = outcome.sweep
    if sweep.report is not None and outcome.finished and not is_uri(outcome.sweep_dir):
        from bench.report.build import build_report

        written = build_report(outcome.sweep_dir, **sweep.report)
        print(f"report: {len(written)} files in {written[0].parent}" if written else "report: nothing written")
    sys.stdout.flush()
    return 1 if outcome.failed else 130 if outcome.unfinished else 0
