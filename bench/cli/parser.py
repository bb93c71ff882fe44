"""The command registry: each command is a function that adds its subparser; `Parser` makes argparse's errors
one line (bench.errors.UsageError, exit status 2)."""

from __future__ import annotations

import argparse

from bench.errors import UsageError


class Parser(argparse.ArgumentParser):
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


# Commands contributed by other modules: each function adds its subparser (help text, arguments) and
# sets `func`, importing the heavy module only when the command runs.
COMMANDS: list = []


def command(fn):
    COMMANDS.append(fn)
    return fn
