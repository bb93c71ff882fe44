"""The README's extension examples must run as shown (in fresh registries, so nothing leaks)."""

import re
from pathlib import Path

import torch

from bench import registry
from bench.registry import Registry

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


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

    prelude = "from bench.data import DataParams, Splits, heldout_split\n" \
              "from pydantic import Field\nimport torch\nfrom torch.utils.data import Subset, TensorDataset\n" \
              "from bench.registry import DATASETS\n"
    exec(compile(prelude + dataset_src, "README-dataset", "exec"), {"__name__": "readme"})
    splits = fresh["DATASETS"].get("mine").factory(fresh["DATASETS"].params("mine", {"val_size": 0.2}), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (800, 200, 200)
