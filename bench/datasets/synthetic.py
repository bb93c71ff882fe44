"""synthetic: seeded random images around class prototypes (tests)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch.utils.data import TensorDataset

from bench.datasets.splits import DataParams, Splits, hold_out
from bench.registry import DATASETS


class SyntheticParams(DataParams):
    num_classes: int = Field(10, ge=2)
    image_size: int = Field(16, ge=4)
    channels: int = Field(3, ge=1)
    train_size: int = Field(1000, ge=2)
    test_size: int = Field(500, ge=1)
    noise: float = Field(1.0, ge=0, description="noise std around each class prototype")


def _synthetic_tensors(p: SyntheticParams, n: int, seed: int) -> TensorDataset:
    # Class prototypes are fixed by the dataset (seed 0) so train and test share them; samples vary.
    protos = torch.randn(p.num_classes, p.channels, p.image_size, p.image_size,
                         generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, p.num_classes, (n,), generator=g)
    x = protos[y] + p.noise * torch.randn(n, p.channels, p.image_size, p.image_size, generator=g)
    return TensorDataset(x, y)


@DATASETS.register("synthetic", SyntheticParams)
def synthetic(p: SyntheticParams, seed: int = 0) -> Splits:
    """Seeded random images around class prototypes: learnable, any size and class count (tests)."""
    full = _synthetic_tensors(p, p.train_size, 1)  # no augmentation: the train view is the eval view
    train, val, info = hold_out(full, full, len(full), p, seed, "synthetic's training set")
    return Splits(train, val, _synthetic_tensors(p, p.test_size, 2), p.num_classes, p.channels, p.image_size,
                  {"files": "generated (seeded)", "train_transform": "none", "eval_transform": "none", **info})
