import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The suite's tensors are tiny: one intra-op thread is as fast, and it stays fast when other processes
# (Ray trial workers, a parallel job) share the two cores.
torch.set_num_threads(1)


@pytest.fixture
def run_cli(capsys):
    """Run `exitbench ARGS...` in-process; returns (exit status, stdout, stderr)."""
    from bench.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, no dashboard) shared by every test that asks for it; sweeps reuse it."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
