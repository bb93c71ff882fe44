"""exitbench command line. Each command parses its arguments here and calls one function of the
module that does the work; bad input anywhere is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys

from bench.errors import UsageError


class _Parser(argparse.ArgumentParser):
    _intermixed = False

    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message by default)
        command = self.prog.removeprefix("exitbench").strip()  # main() already says "exitbench: error:"
        raise UsageError(f"{command}: {message}" if command else message)

    def parse_known_args(self, args=None, namespace=None):
        """A command's KEY=VALUE overrides may come before or after its flags (`flops tiny --json widths=8-16`):
        leaf parsers parse intermixed (argparse's own mode, which refuses parsers that hold subcommands)."""
        if self._intermixed or any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False


def _cmd_list(args) -> int:
    from bench.registry import BACKBONES, DATASETS, METHODS, load_all

    load_all()
    listing = {"backbones": BACKBONES.describe(), "datasets": DATASETS.describe(), "methods": METHODS.describe()}
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
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
    return 0


def _cmd_config_show(args) -> int:
    from bench import config

    raw = config.read_yaml(args.file)
    if config.is_sweep(raw):
        cfg = config.validate_sweep(config.apply_overrides(raw, args.overrides))
    else:
        cfg = config.validate_trial(config.apply_overrides(raw, args.overrides))
    print(config.to_yaml(cfg), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="exitbench", description="Benchmark and ablation harness for early-exiting "
                                                   "(multi-exit) networks.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("list", help="registered backbones (with presets), datasets and methods",
                       description="List registered backbones (with presets), datasets and methods, each with "
                                   "its parameters and defaults.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("config", help="inspect configurations", description="Inspect configurations.")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", parser_class=_Parser, required=True)
    q = csub.add_parser("show", help="print the validated, fully defaulted config as YAML",
                        description="Validate a trial or sweep YAML (with dotted overrides such as optim.lr=0.1) "
                                    "and print it fully defaulted.")
    q.add_argument("file", help="trial or sweep YAML file")
    q.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. method.epsilon=0.5")
    q.set_defaults(func=_cmd_config_show)

    for add in _COMMANDS:
        add(sub)
    return parser


# Commands contributed by other modules: each function adds its subparser (help text, arguments) and
# sets `func`, importing the heavy module only when the command runs.
_COMMANDS: list = []


def command(fn):
    _COMMANDS.append(fn)
    return fn


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except UsageError as err:
        if debug:
            raise
        print(f"exitbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("exitbench: interrupted", file=sys.stderr)
        return 130


from bench import commands  # noqa: E402,F401  (registers the other commands)
