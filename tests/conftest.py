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
    from bench.cli.main import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def check_contract():
    """The multi-exit contract on one model: exit count, logit shapes, a backward pass that reaches every
    parameter, and `forward(x, upto=k)` equal to the k-th output of the full forward (eval mode)."""
    import torch.nn.functional as F

    def check(model, image_size: int, exits: int, num_classes: int = 10):
        assert model.num_exits == exits
        x = torch.randn(2, 3, image_size, image_size)
        outputs = model(x)
        assert [tuple(o.shape) for o in outputs] == [(2, num_classes)] * exits
        sum(F.cross_entropy(o, torch.tensor([1, 0])) for o in outputs).backward()
        assert all(p.grad is not None for p in model.parameters())
        assert sum(p.grad.abs().sum() for p in model.parameters()) > 0
        model.eval()
        with torch.no_grad():
            full = model(x)
            for k in range(1, exits + 1):
                truncated = model(x, upto=k)
                assert len(truncated) == k
                torch.testing.assert_close(truncated[-1], full[k - 1], rtol=0, atol=0)

    return check


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


@pytest.fixture
def fresh_registries(monkeypatch):
    """Empty-of-plugins copies of the three registries (the built-ins stay), so nothing registered leaks."""
    import copy
    import sys

    import bench.backbones  # noqa: F401  (the built-ins register before the copies are made)
    import bench.datasets.check  # noqa: F401  (first imported inside a test, it would keep that copy)
    import methods  # noqa: F401
    from bench import registry

    fresh = {}
    for name in ("METHODS", "BACKBONES", "DATASETS"):
        original = getattr(registry, name)
        reg = copy.copy(original)
        reg._entries, reg._presets = dict(reg._entries), dict(reg._presets)
        fresh[name] = reg
        # Every module that looks the registry up as its own global (e.g. bench.datasets.splits' make_splits).
        for module_name, module in list(sys.modules.items()):
            if module_name.partition(".")[0] in ("bench", "methods") and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, reg)
    monkeypatch.setattr(registry, "_included", [])
    monkeypatch.setattr(sys, "path", list(sys.path))  # include() adds the plugins' folders
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    before = set(sys.modules)
    yield fresh
    for name in set(sys.modules) - before:
        if name.startswith(("readme_", "plugin_", "fakeplug")):
            del sys.modules[name]
