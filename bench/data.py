"""Datasets with honest train / val / test splits.

`build(section, batch_size, seed, device)` returns a DataBundle of three loaders; `val` is held out of
the training set and served with evaluation transforms. `calibration` picks which split budgeted
evaluation calibrates its thresholds on (`heldout` = val, the honest default).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from bench.registry import DATASETS, Params


class DataParams(Params):
    """Options every dataset has."""

    root: str = "data"
    val_size: float = Field(0.1, gt=0, description="held-out val: a count (>= 1) or a fraction (< 1)")
    calibration: Literal["heldout", "train", "test"] = "heldout"
    workers: int = Field(0, ge=0)


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataBundle:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    calibration: str
    num_classes: int
    in_channels: int
    image_size: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def calib(self) -> DataLoader:
        """The loader budgeted evaluation calibrates thresholds on."""
        return {"heldout": self.val, "train": self.train, "test": self.test}[self.calibration]


def heldout_split(n: int, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Seeded permutation of range(n) -> (train indices, val indices, sha1 of the val indices)."""
    n_val = int(val_size) if val_size >= 1 else int(round(n * val_size))
    if not 0 < n_val < n:
        from bench.errors import ConfigError

        raise ConfigError(f"data.val_size: {val_size} gives {n_val} val samples of {n}; need 1..{n - 1}")
    perm = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return train, val, hashlib.sha1(val.astype(np.int64).tobytes()).hexdigest()


class SyntheticParams(DataParams):
    num_classes: int = Field(10, ge=2)
    image_size: int = Field(16, ge=4)
    channels: int = Field(3, ge=1)
    train_size: int = Field(1000, ge=2)
    test_size: int = Field(500, ge=1)
    noise: float = Field(1.0, ge=0, description="noise std around each class prototype")


def _synthetic_tensors(p: SyntheticParams, n: int, seed: int) -> TensorDataset:
    # Class prototypes are fixed by the dataset (seed 0) so train and test share them; samples vary.
    protos = torch.randn(p.num_classes, p.channels, p.image_size, p.image_size, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, p.num_classes, (n,), generator=g)
    x = protos[y] + p.noise * torch.randn(n, p.channels, p.image_size, p.image_size, generator=g)
    return TensorDataset(x, y)


@DATASETS.register("synthetic", SyntheticParams)
def synthetic(p: SyntheticParams, seed: int = 0) -> Splits:
    """Seeded random images around class prototypes: learnable, any size and class count (tests)."""
    full = _synthetic_tensors(p, p.train_size, 1)
    train_idx, val_idx, digest = heldout_split(len(full), p.val_size, seed)
    return Splits(Subset(full, train_idx), Subset(full, val_idx), _synthetic_tensors(p, p.test_size, 2),
                  p.num_classes, p.channels, p.image_size,
                  {"root": None, "val_indices_sha1": digest, "val_indices": val_idx.tolist()})


class DigitsParams(DataParams):
    image_size: int = Field(16, ge=8, description="the 8x8 digits are resized (bilinear) to this size")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="fixed test split (seed 0) of the 1,797 images")


@DATASETS.register("digits", DigitsParams)
def digits(p: DigitsParams, seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): real data, offline."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if p.image_size != 8:
        x = torch.nn.functional.interpolate(x, size=p.image_size, mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4  # roughly zero mean, unit std over the set
    y = torch.tensor(raw.target, dtype=torch.long)
    # The test split is a property of the dataset (seed 0), the same for every trial seed.
    rest, test_idx, _ = heldout_split(len(y), p.test_fraction, 0)
    train_idx, val_idx, digest = heldout_split(len(rest), p.val_size, seed)
    full = TensorDataset(x, y)
    return Splits(Subset(full, rest[train_idx]), Subset(full, rest[val_idx]), Subset(full, test_idx), 10, 1,
                  p.image_size, {"root": "sklearn.datasets.load_digits", "val_indices_sha1": digest})


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


def build(section: dict[str, Any], batch_size: int, seed: int = 0, device: str | torch.device = "cpu") -> DataBundle:
    values = dict(section)
    name = values.pop("name")
    params = DATASETS.params(name, values, where="data")
    splits: Splits = DATASETS.get(name).factory(params, seed=seed)
    on_gpu = torch.device(device).type == "cuda"
    common = dict(num_workers=params.workers, pin_memory=on_gpu, persistent_workers=params.workers > 0,
                  worker_init_fn=_seed_worker if params.workers > 0 else None)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(splits.train, batch_size=batch_size, shuffle=True, drop_last=len(splits.train) > batch_size,
                       generator=g, **common)
    val = DataLoader(splits.val, batch_size=batch_size, shuffle=False, **common)
    test = DataLoader(splits.test, batch_size=batch_size, shuffle=False, **common)
    info = {"dataset": name, "train_size": len(splits.train), "val_size": len(splits.val),
            "test_size": len(splits.test), "calibration": params.calibration, **splits.info}
    return DataBundle(train, val, test, params.calibration, splits.num_classes, splits.in_channels,
                      splits.image_size, info)
