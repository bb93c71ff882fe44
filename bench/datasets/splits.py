"""Honest train / val / test splits, and the loaders over them.

`build(section, batch_size, seed, device)` returns a DataBundle of three loaders. `val` is held out of the
training set by a seeded permutation (its sha1 goes into `info`) and is served with EVALUATION transforms:
each dataset builds two views over the same images (train transforms, eval transforms) and val is a subset
of the eval view, never of the augmented one. `calibration` picks the split budgeted evaluation calibrates
its thresholds on: `heldout` (val, the honest default), or `train` (L2W-DEN: augmented training images) and
`test` (MSDNet without --use-valid, RANet) to reproduce the reference protocols; those are flagged in `info`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch.utils.data import DataLoader, Dataset, Subset

from bench.errors import ConfigError
from bench.registry import DATASETS, Params


class DataParams(Params):
    """Options every dataset has."""

    root: str = Field("data", description="folder that holds the dataset's files")
    val_size: int | float = Field(0.1, gt=0, description="held-out val: a count (whole number >= 1) or a fraction "
                                                         "(0 < f < 1) of the training set")
    split_seed: int | None = Field(None, ge=0, description="seed of the val hold-out (default: the trial seed)")
    calibration: Literal["heldout", "train", "test"] = "heldout"
    train_on_val: bool = Field(False, description="train on the val images too (the reference protocols' full "
                                                  "training set); only with calibration train or test")
    workers: int = Field(0, ge=0, description="loader worker processes per split")
    train_subset: int | None = Field(None, ge=1, description="train on a seeded subset of this many of the images "
                                                             "left after val is held out (default: all of them)")

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, v: int | float) -> int | float:
        if v >= 1 and v != int(v):
            raise ValueError(f"{v} is neither a count (a whole number >= 1) nor a fraction (0 < f < 1)")
        return int(v) if v >= 1 else v

    @model_validator(mode="after")
    def _honest_val(self):
        if self.train_on_val and self.calibration == "heldout":
            raise ValueError("train_on_val=true leaves no held-out split: set calibration to train or test, "
                             "or train_on_val=false")
        return self


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


def heldout_split(n: int, val_size: float, seed: int, what: str = "the training set"
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """Seeded permutation of range(n) -> (train indices, val indices, sha1 of the val indices), both sorted."""
    if val_size >= 1 and val_size != int(val_size) or val_size <= 0:
        raise ConfigError(f"data.val_size: {val_size} is neither a count (a whole number >= 1) nor a fraction "
                          f"(0 < f < 1)")
    n_val = int(val_size) if val_size >= 1 else int(round(n * val_size))
    if n_val >= n:
        raise ConfigError(f"data.val_size: {val_size} asks for {n_val} val samples but {what} has only {n}; "
                          f"use a count 1..{n - 1} or a fraction 0 < f < 1")
    if n_val < 1:
        raise ConfigError(f"data.val_size: the fraction {val_size} of {n} samples is 0 val samples; use a larger "
                          f"fraction or a count")
    perm = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return train, val, hashlib.sha1(val.astype(np.int64).tobytes()).hexdigest()


def hold_out(train_view: Dataset, eval_view: Dataset, n: int, p: DataParams, seed: int, what: str
              ) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """(train, val, info): val = a seeded subset of the EVAL view; train = the rest of the train view."""
    train_idx, val_idx, digest = heldout_split(n, p.val_size, seed, what)
    if p.train_on_val:
        train_idx = np.arange(n)
    info: dict[str, Any] = {"val_indices_sha1": digest, "val_in_train": p.train_on_val}
    if p.train_subset is not None:
        if p.train_subset > len(train_idx):
            raise ConfigError(f"data.train_subset: {p.train_subset} is more than the {len(train_idx)} training "
                              f"images {what} leaves after val; use 1..{len(train_idx)} or null for all")
        # Its own stream (seed + 1) so the subset never correlates with the val permutation.
        pick = np.random.default_rng(seed + 1).permutation(len(train_idx))[:p.train_subset]
        train_idx = np.sort(train_idx[pick])
        info["train_subset_sha1"] = hashlib.sha1(train_idx.astype(np.int64).tobytes()).hexdigest()
    train = train_view if p.train_on_val and p.train_subset is None else Subset(train_view, train_idx)
    return train, Subset(eval_view, val_idx), info


# --------------------------------------------------------------------------------------------------- loaders


def seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base from the loader's generator); numpy and
    # random follow it so any library drawing from them is seeded too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_splits(section: dict[str, Any], seed: int = 0) -> tuple[str, DataParams, Splits]:
    """Validate a data section `{name, **params}` and build its splits; the common facts go into `info`."""
    values = dict(section)
    name = values.pop("name")
    params = DATASETS.params(name, values, where="data")
    split_seed = seed if params.split_seed is None else params.split_seed
    splits: Splits = DATASETS.get(name).factory(params, seed=split_seed)
    splits.info = {
        "dataset": name, "train_size": len(splits.train), "val_size": len(splits.val), "test_size": len(splits.test),
        "num_classes": splits.num_classes, "in_channels": splits.in_channels, "image_size": splits.image_size,
        "calibration": params.calibration, "calibration_flagged": params.calibration != "heldout",
        "split_seed": split_seed, **splits.info,
    }
    return name, params, splits


def build(section: dict[str, Any], batch_size: int, seed: int = 0, device: str | torch.device = "cpu") -> DataBundle:
    name, params, splits = make_splits(section, seed)
    on_gpu = torch.device(device).type == "cuda"
    common = dict(num_workers=params.workers, pin_memory=on_gpu, persistent_workers=params.workers > 0,
                  worker_init_fn=seed_worker if params.workers > 0 else None)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(splits.train, batch_size=batch_size, shuffle=True, drop_last=len(splits.train) > batch_size,
                       generator=g, **common)
    val = DataLoader(splits.val, batch_size=batch_size, shuffle=False, **common)
    test = DataLoader(splits.test, batch_size=batch_size, shuffle=False, **common)
    info = {**splits.info, "batch_size": batch_size, "workers": params.workers}
    return DataBundle(train, val, test, params.calibration, splits.num_classes, splits.in_channels,
                      splits.image_size, info)

