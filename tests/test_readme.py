"""Every code snippet of the README runs as shown: python examples (in fresh registries, so nothing leaks),
YAML blocks validated as trial or sweep configs, and shell blocks executed command by command with tiny
settings where they would train or read data (`exitbench` in-process, in a temporary folder).

A shell block that must not run here (it starts a cluster, installs, or runs the whole suite) is marked on the
line before its fence with `<!-- readme: no-run (why) -->`; such marks are few and each gives its reason."""

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

import bench.config  # noqa: F401  (bound to the real registries before the examples swap in fresh ones)
from bench import registry
from bench.registry import Registry, load_all

load_all()

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
FENCE = re.compile(r"^(?: *(?P<mark><!-- readme: no-run \((?P<why>[^)]*)\) -->)\n)?(?P<indent> *)```(?P<lang>[a-z]*)\n"
                   r"(?P<body>.*?)^(?P=indent)```", flags=re.S | re.M)
SNIPPETS = [(m["lang"], re.sub(rf"(?m)^{m['indent']}", "", m["body"]), m["why"]) for m in FENCE.finditer(README)]
MAX_NO_RUN = 3
# Tiny settings: every command that would train or read a dataset runs on small synthetic data, one epoch.
TINY_DATA = ["data=synthetic", "data.num_classes=10", "data.image_size=32", "data.train_size=32",
             "data.test_size=16", "data.val_size=0.25", "batch_size=16", "device=cpu"]
TINY_TRAIN = ["epochs=1", "progress=false", *TINY_DATA]


def test_readme_extension_examples_run(monkeypatch):
    assert len(BLOCKS) == 3
    fresh = {"METHODS": Registry("method"), "BACKBONES": Registry("backbone"), "DATASETS": Registry("dataset")}
    for name, reg in fresh.items():
        monkeypatch.setattr(registry, name, reg)
    method_src, backbone_src, dataset_src = BLOCKS
    exec(compile(backbone_src, "README-backbone", "exec"), {})
    model = fresh["BACKBONES"].build("mine-wide", num_classes=5)
    assert [z.shape for z in model(torch.randn(2, 3, 16, 16))] == [(2, 5), (2, 5)]

    exec(compile(method_src, "README-method", "exec"), {})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = fresh["METHODS"].build("focal", {"gamma": 1.0}, model=model, optimizer=opt, total_steps=1)
    out = strategy.step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), 0)
    assert out.count == 4 and out.exit_losses.shape == (2,)

    prelude = "from bench.datasets import DataParams, Splits, heldout_split\n" \
              "from pydantic import Field\nimport torch\nfrom torch.utils.data import Subset, TensorDataset\n" \
              "from bench.registry import DATASETS\n"
    exec(compile(prelude + dataset_src, "README-dataset", "exec"), {"__name__": "readme"})
    splits = fresh["DATASETS"].get("mine").factory(fresh["DATASETS"].params("mine", {"val_size": 0.2}), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (800, 200, 200)


@pytest.mark.parametrize("index", [i for i, (lang, _, _) in enumerate(SNIPPETS) if lang == "yaml"])
def test_readme_yaml_blocks_are_valid_configs(index):
    from bench.config import is_sweep, validate_sweep, validate_trial

    raw = yaml.safe_load(SNIPPETS[index][1])
    assert isinstance(raw, dict), SNIPPETS[index][1]
    validate_sweep(raw) if is_sweep(raw) else validate_trial(raw)  # a ConfigError names the bad field


def test_no_run_marks_are_few_and_give_reasons():
    marked = [why for lang, _, why in SNIPPETS if why is not None]
    assert len(marked) <= MAX_NO_RUN and all(why.strip() for why in marked), marked


def commands(body: str) -> list[list[str]]:
    """The block's commands as argument lists (continuations joined, comments dropped)."""
    return [words for line in body.replace("\\\n", " ").splitlines()
            if (words := shlex.split(line, comments=True))]


def without_data(args: list[str]) -> list[str]:
    return [a for a in args if not re.match(r"(data|device|batch_size)(\.|=)", a)]


def reference_checkpoint(path: Path, args: list[str]) -> None:
    """A stand-in for a downloaded reference checkpoint: the named backbone, in MSDNet-PyTorch's format."""
    from bench.config import apply_overrides, validate_trial
    from bench.registry import BACKBONES

    spec = dict(validate_trial(apply_overrides({}, [a for a in args if "=" in a])).backbone)
    model = BACKBONES.build(spec.pop("name"), spec, num_classes=10, in_channels=3, image_size=32)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)


def tiny(args: list[str], cwd: Path) -> list[str]:
    """The command with tiny settings where it would train or read data; files it names are made first."""
    command, rest = args[0], args[1:]
    if command == "train":
        return [command, *without_data(rest), *TINY_TRAIN]
    if command == "evaluate":
        if not (cwd / rest[0]).exists():
            reference_checkpoint(cwd / rest[0], rest[1:])
        return [command, *without_data(rest), *TINY_DATA]
    if command == "latency":
        return [command, *rest, "--limit", "20", "--budgets", "1", "39", "--threads", "1"]
    return args


def _shell_ids():
    return [i for i, (lang, _, why) in enumerate(SNIPPETS) if lang in ("bash", "sh", "shell") and why is None]


@pytest.mark.slow
@pytest.mark.parametrize("index", _shell_ids())
def test_readme_shell_blocks_run(index, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in commands(SNIPPETS[index][1]):
        assert args[0] == "exitbench", (f"README shell block {index} runs {args[0]!r}: only exitbench commands run "
                                        f"here; mark the block <!-- readme: no-run (why) --> if it must not run")
        code, out, err = run_cli(*tiny(args[1:], tmp_path))
        assert code == 0, (shlex.join(args), err)
