import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture
def run_cli(capsys):
    """Run `exitbench ARGS...` in-process; returns (exit status, stdout, stderr)."""
    from bench.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
