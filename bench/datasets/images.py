"""Transforms and dataset views: how the images of a dataset reach a model, and where its files are.

In-memory sets (CIFAR, Fashion-MNIST, digits) keep one uint8/float array shared by both views and augment it
with numpy (about 10x faster per sample than torchvision's tensor transforms); folder sets (ImageNet,
tiny-ImageNet) scan the folder once and keep the file list as one numpy byte array, so forked workers do not
copy it page by page (Python lists of tuples get their refcounts touched on every read).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------------------------- transforms
# Small picklable callables over CHW numpy arrays (or PIL images for the folder sets). Random draws use
# torch's global RNG, which the DataLoader seeds per worker (base seed from the loader's generator + id).


class Pipeline:
    def __init__(self, *steps: Callable):
        self.steps = steps

    def __call__(self, img):
        for step in self.steps:
            img = step(img)
        return img

    def __repr__(self) -> str:
        return " + ".join(repr(s) for s in self.steps)


class RandomPadCropFlip:
    """Zero-pad by `padding`, take a uniform random size x size crop, flip left-right with p=0.5 — the same
    distribution as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip()."""

    def __init__(self, size: int, padding: int, flip: bool = True):
        self.size, self.padding, self.flip = size, padding, flip

    def __call__(self, img: np.ndarray) -> np.ndarray:
        c, h, w = img.shape
        p, s = self.padding, self.size
        if p:
            padded = np.zeros((c, h + 2 * p, w + 2 * p), img.dtype)
            padded[:, p:p + h, p:p + w] = img
            img = padded
        rows, cols = img.shape[1] - s + 1, img.shape[2] - s + 1
        r = int(torch.randint(rows * cols * (2 if self.flip else 1), ()))  # one draw: offset and flip
        i, j, flip = r % rows, (r // rows) % cols, r // (rows * cols)
        out = img[:, i:i + s, j:j + s]
        return out[:, :, ::-1] if flip else out

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})" + (" + HorizontalFlip" if self.flip else "")


class Normalize:
    """CHW array (uint8 in 0..255, or float in 0..1 with max_value=1) -> float32 tensor (x/max - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], max_value: float = 255.0):
        self.mean, self.std = tuple(mean), tuple(std)
        std_arr = np.asarray(std, np.float32).reshape(-1, 1, 1)
        self._scale = (1.0 / (max_value * std_arr)).astype(np.float32)
        self._shift = (-np.asarray(mean, np.float32).reshape(-1, 1, 1) / std_arr).astype(np.float32)

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(img * self._scale + self._shift, dtype=np.float32))

    def __repr__(self) -> str:
        return f"Normalize(mean={list(self.mean)}, std={list(self.std)})"


class ToArray:
    """PIL image -> CHW uint8 array (RGB)."""

    def __call__(self, img) -> np.ndarray:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))

    def __repr__(self) -> str:
        return "ToArray"


# -------------------------------------------------------------------------------------------- dataset views


class ArrayImages(Dataset):
    """Images held in memory (N x C x H x W array shared between views) under one view's transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


class FileImages(Dataset):
    """Image files under `folder` (relative paths as one numpy byte array, labels as int64) under a transform."""

    def __init__(self, folder: str | Path, paths: np.ndarray, labels: np.ndarray, transform: Callable):
        self.folder, self.paths, self.labels, self.transform = str(folder), paths, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.folder, os.fsdecode(self.paths[i]))

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.path(i)) as img:
            img = img.convert("RGB")
        return self.transform(img), int(self.labels[i])


@contextlib.contextmanager
def removed_on_failure(root: Path):
    """A download that fails leaves no folder behind that it created (the outermost missing one of `root`)."""
    root = root.absolute()
    created = None
    for folder in [root, *root.parents]:
        if folder.exists():
            break
        created = folder
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def absolute_path(path: Path) -> str:
    """A path as the user reads it in a message: user folder expanded, absolute."""
    return str(path.expanduser().absolute())


def files_sha256(paths: Sequence[Path]) -> str:
    """One sha256 over the files a dataset read (each file's name and the sha256 of its bytes, in name order):
    two trials that record the same value read the same bytes."""
    import hashlib

    whole = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        whole.update(f"{path.name} {digest.hexdigest()}\n".encode())
    return whole.hexdigest()
