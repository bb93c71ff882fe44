"""exitbench command line: the parser (the commands of bench.cli.commands under `exitbench`) and `main`, which
turns bad input anywhere into one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench.cli import commands  # noqa: F401  (registers the commands)
from bench.cli.parser import COMMANDS, Parser
from bench.errors import UsageError


def _cmd_list(args) -> int:
    from bench.config import bundled_sweeps, describe_bundled
    from bench.registry import BACKBONES, DATASETS, METHODS, load_all

    load_all()
    listing = {"backbones": BACKBONES.describe(), "datasets": DATASETS.describe(), "methods": METHODS.describe()}
    sweeps = [{"name": name, "doc": describe_bundled(path), "path": str(path)}
              for name, path in bundled_sweeps().items()]
    if args.json:
        print(json.dumps({**listing, "sweeps": sweeps}, indent=2, default=str))
        return 0
    for kind, rows in listing.items():
        print(f"{kind}:")
        for row in rows:
            print(f"  {row['name']:<14} {row['doc']}")
            params = ", ".join(f"{k}={v!r}" for k, v in row["params"].items())
            if params:
                print(f"  {'':<14} params: {params}")
            for preset, values in row["presets"].items():
                print(f"  {'':<14} preset {preset}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
        print()
    print("sweeps (bundled; `exitbench sweep NAME`, `exitbench config show NAME`):")
    for row in sweeps:
        print(f"  {row['name']:<18} {row['doc']}")
    return 0


def _cmd_config_show(args) -> int:
    from bench import config

    path, overrides = config.split_config_arg(args.file, args.overrides)
    raw = config.read_yaml(config.resolve_config(path)) if path else {}
    if config.is_sweep(raw):
        cfg = config.validate_sweep(config.apply_overrides(raw, overrides, sweep=True))
    else:
        cfg = config.validate_trial(config.apply_overrides(raw, overrides))
    print(config.to_yaml(cfg), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="exitbench", description="Benchmark and ablation harness for early-exiting "
                                                   "(multi-exit) networks.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--include", action="append", default=[], metavar="PATH",
                        help="import a .py file (or every .py file of a folder) that registers methods, backbones "
                             "or datasets before the command runs; repeatable")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("list", help="registered backbones (with presets), datasets and methods",
                       description="List registered backbones (with presets), datasets and methods, each with "
                                   "its parameters and defaults.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("config", help="inspect configurations", description="Inspect configurations.")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", parser_class=Parser, required=True)
    q = csub.add_parser("show", help="print the validated, fully defaulted config as YAML",
                        description="Validate a trial or sweep YAML (with dotted overrides such as optim.lr=0.1) "
                                    "and print it fully defaulted; without a file, the default trial.",
                        epilog="examples: exitbench config show;  exitbench config show method=l2w epochs=2;  "
                               "exitbench config show default epochs=1")
    q.add_argument("file", nargs="?", default=None,
                   help="trial or sweep YAML file, or a bundled sweep's name (default: the trial defaults)")
    q.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. method.epsilon=0.5")
    q.set_defaults(func=_cmd_config_show)

    for add in COMMANDS:
        add(sub)
    return parser


def _reader_gone() -> int:
    """The reader of our stdout went away (`exitbench budget ... --json | head`): not an error of ours. Point
    stdout at devnull so the interpreter's own flush at exit does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # what a Unix tool stopped by SIGPIPE reports (128 + 13), without a traceback


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.include:
            from bench.registry import include

            include(args.include)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        return _reader_gone()
    except SystemExit:  # --help: argparse printed and exits; its text may meet a closed pipe too
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            raise SystemExit(_reader_gone()) from None
        raise
    except UsageError as err:
        if debug:
            raise
        print(f"exitbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("exitbench: interrupted", file=sys.stderr)
        return 130


