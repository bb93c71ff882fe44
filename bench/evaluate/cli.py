"""The evaluation commands: `exitbench evaluate` (a checkpoint on its data), `budget` (a logits file) and
`latency` (real early exit of a run)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from bench import backbones, datasets
from bench.config import resolve_device, validate_trial
from bench.errors import UsageError
from bench.evaluate.latency import format_table, run_latency
from bench.evaluate.logits import load_logits
from bench.evaluate.protocol import evaluate_logits, evaluate_model
from bench.runfolder import CHECKPOINT, LOGITS, RESULT, TRIAL_RUN, latest_checkpoint, sweep_includes, trial_folder


def checkpoint_of(path: Path) -> Path:
    """The checkpoint file `path` names: a file, a run folder's checkpoint.pt, or the newest checkpoint a sweep's
    trial folder kept (given the trial folder or its run/ folder)."""
    if path.is_file():
        return path
    if (path / CHECKPOINT).is_file():
        return path / CHECKPOINT
    trial = trial_folder(path)
    newest = latest_checkpoint(trial) if trial is not None else None
    if newest is not None:
        return newest
    if trial is not None:
        raise UsageError(f"sweep trial folder {str(trial)!r} kept no checkpoint (checkpoint_NNNNNN/{CHECKPOINT}); "
                         f"did the trial train an epoch?")
    raise UsageError(f"no checkpoint at {str(path)!r} (expected a run folder, its {CHECKPOINT}, a sweep's trial "
                     f"folder, or a reference checkpoint file)")


def _trial_config(raw: dict, path: Path, command: str, given: str):
    """`validate_trial(raw)`; a component the config names but nothing registered (a plugin's, in a sweep started
    with --include) is one line naming the --include that the sweep was started with."""
    from bench.errors import ConfigError
    from bench.registry import included

    try:
        return validate_trial(raw)
    except ConfigError as err:
        plugins = [p for p in sweep_includes(path) if p not in included()]
        if not plugins or "unknown" not in str(err):
            raise
        flags = " ".join(f"--include {shlex.quote(p)}" for p in plugins)
        raise ConfigError(f"{err}; the sweep was started with {flags}: `exitbench {flags} {command} "
                          f"{shlex.quote(given)}`") from None


def cli_evaluate(args) -> int:
    """Evaluate a checkpoint (file or run folder): an exitbench one rebuilds data and model from its config; a
    reference project's file (MSDNet, L2W-DEN, RANet, IMTA; detected by content) takes backbone=... data=..."""
    from bench.backbones.checkpoint import load_weights, parse, read_file
    from bench.config import apply_overrides

    path = checkpoint_of(Path(args.checkpoint))
    weights = parse(read_file(path), str(path))
    if weights.config is None and not any(o.split("=")[0].split(".")[0] == "backbone" for o in args.overrides):
        raise UsageError(f"{str(path)!r} is a {weights.kind} checkpoint, which records no config: give the "
                         f"backbone it was trained with, e.g. backbone=msdnet-cifar-budget data=cifar100")
    cfg = _trial_config(apply_overrides(weights.config or {}, args.overrides), path, "evaluate", args.checkpoint)
    device = resolve_device(cfg.device)
    bundle = datasets.build(cfg.data, cfg.batch_size, seed=cfg.seed, device=device)
    model = backbones.build(cfg.backbone, bundle.num_classes, bundle.in_channels, bundle.image_size)
    load_weights(model, weights.model, f"{str(path)!r} ({weights.kind} checkpoint)")
    model.to(device)
    if weights.note:
        print(f"note: {weights.note}", file=sys.stderr)
    from bench.flops import per_exit_cost
    from bench.readout import build_readout, readout_macs

    readout = build_readout(cfg.method, model.num_exits, bundle.num_classes).to(device)
    try:  # checkpoints from before readouts existed hold none: fine for the identity, which has no weights
        readout.load_state_dict(weights.readout or {})
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:]) or str(err)  # line 1 names no key
        trained = (weights.config or {}).get("method")
        fix = (f"the run was trained with method {trained}: drop the method overrides that change the readout"
               if trained else "the file holds no trained readout: evaluate it without method=...")
        raise UsageError(f"checkpoint's readout does not fit method {cfg.method['name']!r} as configured here "
                         f"({detail.rstrip('. ')}); {fix}") from None
    readout_cost = readout_macs(readout)
    macs = [e.macs + r for e, r in
            zip(per_exit_cost(model, bundle.image_size, bundle.in_channels).exits, readout_cost)]
    # a progress bar per split unless progress=false is given here (a sweep trial's config says false: that
    # was for its Ray worker, not for this terminal)
    progress = cfg.progress or not any(o.partition("=")[0] == "progress" for o in args.overrides)
    report = evaluate_model(model, readout, bundle.calib, bundle.test, device, macs,
                            readout_macs=readout_cost, confidence=cfg.eval.confidence, progress=progress)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _mmacs(value) -> str:
    """MACs in millions, as every other MACs figure of the report ('-': never reached)."""
    return "-" if value is None else f"{value / 1e6:.4f} M"


def format_report(report: dict) -> str:
    """Text tables of an `evaluate_logits` report: anytime, budgeted batch, summary."""
    readout = any(row.get("readout_macs") for row in report["anytime"])
    lines = ["anytime (test split)", f"{'exit':>4}  {'top-1 %':>8}  {'top-5 %':>8}  {'MACs (M)':>11}"
             + (f"  {'readout MACs':>14}" if readout else "")]  # a count, not millions: readouts are small
    for row in report["anytime"]:
        lines.append(f"{row['exit']:>4}  {row['top1']:>8.2f}  {row['top5']:>8.2f}  {row['macs'] / 1e6:>11.4f}"
                     + (f"  {row['readout_macs']:>14,.0f}" if readout else ""))
    s = report["summary"]
    lines += ["", f"budgeted batch (confidence {s.get('confidence')}; exit thresholds fitted on the calibration "
                  f"split: val % is that split, test % the test split; `--json` gives the thresholds)",
              f"{'p':>3}  {'q':>5}  {'val %':>7}  {'test %':>7}  {'E[MACs] (M)':>11}  exit fractions"]
    for row in report["budgets"]:
        fractions = " ".join(f"{f:.3f}" for f in row["exit_fractions"])
        lines.append(f"{row['p']:>3}  {row['p'] / 20:>5.2f}  {row['val_acc']:>7.2f}  {row['test_acc']:>7.2f}  "
                     f"{row['expected_macs'] / 1e6:>11.4f}  {fractions}")
    lines += ["", "summary"]
    lines.append("  accuracy at 25/50/75/100 % of exit K's MACs: " + " / ".join(
        _fmt(s[f"acc_at_{pct}pct"]) for pct in (25, 50, 75, 100)))
    for item in s["acc_at_macs"]:
        lines.append(f"  accuracy at {item['macs'] / 1e6:.4f} M MACs: {_fmt(item['acc'])}")
    low, high = s["auc_range"]
    lines.append(f"  AUC (mean top-1 % over {low / 1e6:.4f}..{high / 1e6:.4f} M MACs): budgeted {s['auc']:.3f}, "
                 f"anytime {s['anytime_auc']:.3f}")
    lines.append(f"  best of the 39 budgets {s['best_acc']:.2f} % at {s['best_acc_macs'] / 1e6:.4f} M MACs "
                 f"(reports' best: the top of the curve with each exit alone)")
    lines.append(f"  exit K accuracy {s['full_acc']:.2f} % first reached at {_mmacs(s['macs_at_full_acc'])} MACs "
                 f"(speed-up {_fmt(s['speedup_at_full_acc'], '.2f')}x)")
    for item in s["macs_to_reach"]:
        lines.append(f"  {item['acc']:.2f} % first reached at {_mmacs(item['macs'])} MACs")
    if "oracle_acc" in s:
        lines.append(f"  oracle exit (earliest correct): {s['oracle_acc']:.2f} % at "
                     f"{s['oracle_macs'] / 1e6:.4f} M MACs")
    return "\n".join(lines)


def cli_budget(args) -> int:
    data = load_logits(args.logits)
    report = evaluate_logits(data, confidence=args.confidence, at_macs=getattr(args, "at_macs", None) or (),
                             target_accs=getattr(args, "target_acc", None) or (),
                             auc_range=getattr(args, "auc_range", None))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _checkpoint(run_dir: Path) -> Path:
    """The run's checkpoint.pt; for a sweep trial's run folder, the newest one Ray Tune kept for the trial."""
    if (run_dir / CHECKPOINT).is_file():
        return run_dir / CHECKPOINT
    trial = trial_folder(run_dir)
    kept = latest_checkpoint(trial) if trial is not None else None
    if kept is not None:
        return kept
    raise UsageError(f"no {CHECKPOINT} in {str(run_dir)!r} (nor a Ray Tune checkpoint beside it); give the folder "
                     f"of a finished `exitbench train` run")


def _store_dir(run_dir: Path) -> Path:
    """The sweep folder whose results store holds this trial, else the run folder itself (a store of one)."""
    for parent in list(run_dir.resolve().parents)[:4]:
        if (parent / "store" / "runs").is_dir():
            return parent
    return run_dir


def cli_latency(args) -> int:
    from bench import results
    from bench.backbones.checkpoint import load_weights, parse, read_file
    from bench.readout import build_readout

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run folder {str(run_dir)!r} does not exist; give the out_dir of an `exitbench train` run "
                         f"or a sweep's trial folder")
    trial = trial_folder(run_dir)
    if trial is not None and (trial / TRIAL_RUN).is_dir():  # a sweep's trial folder: its run/ folder
        run_dir = trial / TRIAL_RUN
    for name in (RESULT, LOGITS):
        if not (run_dir / name).is_file():
            raise UsageError(f"{str(run_dir)!r} has no {name}: latency needs a finished run (its thresholds and "
                             f"saved logits)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device is not None and args.device not in ("auto", "cpu", "cuda") and \
            not (args.device.startswith("cuda:") and args.device[5:].isdigit()):
        raise UsageError(f"--device {args.device!r}: give cpu, cuda, cuda:N or auto")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    record = results.ResultRecord.model_validate_json((run_dir / RESULT).read_text())
    if record.status != "finished" or not record.budgets:
        raise UsageError(f"{str(run_dir)!r}: the run's status is {record.status!r} with {len(record.budgets)} budgets; "
                         f"latency needs a finished run")
    ckpt = _checkpoint(run_dir)
    weights = parse(read_file(ckpt), str(ckpt))
    cfg = _trial_config(record.config, run_dir, "latency", args.run_dir)
    wanted = args.device or cfg.device
    if wanted.startswith("cuda") and not torch.cuda.is_available():  # the option here is --device, not device=
        given = f"--device {args.device}" if args.device else f"the run's device={cfg.device} (its config)"
        raise UsageError(f"{given} asks for CUDA, which is not available here; use --device cpu or --device auto")
    device = resolve_device(wanted)
    bundle = datasets.build(cfg.data, cfg.batch_size, seed=cfg.seed, device=torch.device("cpu"))
    model = backbones.build(cfg.backbone, bundle.num_classes, bundle.in_channels, bundle.image_size)
    load_weights(model, weights.model, str(ckpt))
    images, labels = zip(*[(x, torch.as_tensor(y)) for x, y in bundle.test])
    images, labels = torch.cat(images), torch.cat(labels).long()
    saved = load_logits(run_dir / LOGITS)
    if not torch.equal(labels, saved["test_labels"]):
        raise UsageError(f"the test split rebuilt from {str(run_dir / 'result.json')!r} does not match the labels in "
                         f"logits.pt; the data files changed since the run")
    budgets = record.budgets
    if args.budgets:
        unknown = sorted(set(args.budgets) - {b["p"] for b in budgets})
        if unknown:
            raise UsageError(f"--budgets {unknown}: not among the run's budgets p = 1..{len(budgets)}")
        budgets = [b for b in budgets if b["p"] in set(args.budgets)]
    if args.limit is not None:
        if args.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {args.limit}")
        images, labels = images[:args.limit], labels[:args.limit]
        saved = {**saved, "test_logits": saved["test_logits"][:, :args.limit],
                 "test_labels": saved["test_labels"][:args.limit]}
    readout = build_readout(cfg.method, model.num_exits, bundle.num_classes)
    readout.load_state_dict(weights.readout or {})
    rows = run_latency(model, images, labels, saved, budgets, device, args.batch_size, cfg.eval.confidence, readout)
    print(format_table(rows))
    record = record.model_copy(update={"latency": rows})
    results.atomic_write_text(run_dir / RESULT, record.model_dump_json(indent=1))
    store = _store_dir(run_dir)
    results.write(record, store)
    print(f"written: {run_dir / 'result.json'} (latency) and the latency table of {store / 'store'}")
    return 0
