"""digits: scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from bench.datasets.images import ArrayImages, Normalize, Pipeline, RandomPadCropFlip, files_sha256
from bench.datasets.splits import DataParams, Splits, heldout_split, hold_out
from bench.registry import DATASETS


class DigitsParams(DataParams):
    image_size: int = Field(16, ge=8, description="the 8x8 digits are resized (bilinear) to this size")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="fixed test split (seed 0) of the 1,797 images")
    augment: bool = Field(False, description="random shifts of up to image_size/8 pixels for training (no flips)")


@DATASETS.register("digits", DigitsParams)
def digits(p: DigitsParams, seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): real data, offline."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if p.image_size != 8:
        x = torch.nn.functional.interpolate(x, size=p.image_size, mode="bilinear", align_corners=False)
    images, labels = x.numpy(), raw.target.astype(np.int64)
    normalize = Normalize([0.3], [0.4], max_value=1.0)  # roughly zero mean, unit std over the set
    eval_tf = Pipeline(normalize)
    train_tf = Pipeline(RandomPadCropFlip(p.image_size, p.image_size // 8, flip=False), normalize) if p.augment \
        else eval_tf
    # The test split is a property of the dataset (seed 0), the same for every trial seed.
    rest, test_idx, _ = heldout_split(len(labels), p.test_fraction, 0, "digits")
    rest_x, rest_y = images[rest], labels[rest]  # one array shared by both views
    train_view, eval_view = ArrayImages(rest_x, rest_y, train_tf), ArrayImages(rest_x, rest_y, eval_tf)
    train, val, info = hold_out(train_view, eval_view, len(rest), p, seed, "digits' training set")
    test = ArrayImages(images[test_idx], labels[test_idx], eval_tf)
    bundled = Path(str(importlib.resources.files("sklearn.datasets.data") / "digits.csv.gz"))
    return Splits(train, val, test, 10, 1, p.image_size,
                  {"files": "sklearn.datasets.load_digits (bundled)", "files_sha256": files_sha256([bundled]),
                   "train_transform": repr(train_tf),
                   "eval_transform": repr(eval_tf), **info})
