"""fashion-mnist: IDX files from torchvision's download or Debian's dataset-fashion-mnist package."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from bench.datasets.images import (
    ArrayImages,
    Normalize,
    Pipeline,
    RandomPadCropFlip,
    absolute_path,
    files_sha256,
    removed_on_failure,
)
from bench.datasets.splits import DataParams, Splits, hold_out
from bench.errors import UsageError
from bench.registry import DATASETS

# Where Debian's `dataset-fashion-mnist` package installs the gzipped IDX files (searched after data.root).
SYSTEM_FASHION_MNIST_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
_FMNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]
FMNIST_MEAN_STD = ([0.2860], [0.3530])


class FashionMnistParams(DataParams):
    image_size: int = Field(28, ge=8, description="the 28x28 images are resized (bilinear) to this size")
    download: bool = Field(False, description="download to root with torchvision when the files are missing")
    augment: bool = Field(True, description="RandomCrop(size, padding=size/14) + HorizontalFlip for training")


def _idx_file(folder: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian header, uint8 payload), gzipped or not."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UsageError(f"fashion-mnist: cannot read {path}: {err}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise UsageError(f"fashion-mnist: {path} is not a uint8 IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise UsageError(f"fashion-mnist: {path} holds {payload.size} bytes of data, its header says {dims}")
    return payload.reshape(dims)


def _fmnist_folder(root: Path, download: bool) -> tuple[Path, list[Path]]:
    candidates = [root / "FashionMNIST" / "raw", root / "fashion-mnist", root, *SYSTEM_FASHION_MNIST_DIRS]
    for folder in candidates:
        files = [_idx_file(folder, base) for base in _FMNIST_FILES]
        if all(files):
            return folder, files
    if download:
        import torchvision

        try:
            with removed_on_failure(root):
                for train in (True, False):
                    torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
        except Exception as err:
            raise UsageError(f"fashion-mnist: download into {absolute_path(root)} failed: {str(err).splitlines()[0]}"
                             ) from None
        return _fmnist_folder(root, False)
    looked = ", ".join(absolute_path(c) for c in candidates)
    raise UsageError(f"fashion-mnist: IDX files ({', '.join(_FMNIST_FILES)}, gzipped or not) not found in {looked}; "
                     f"get them with `make data` (as root: apt-get install -y dataset-fashion-mnist), or set "
                     f"data.root=DIR or data.download=true")


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """N x C x H x W uint8 -> N x C x size x size (antialiased bilinear), once for the whole set."""
    if images.shape[-2:] == (size, size):
        return images
    x = torch.nn.functional.interpolate(torch.tensor(images, dtype=torch.float32), size=(size, size),
                                        mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).numpy()


@DATASETS.register("fashion-mnist", FashionMnistParams)
def fashion_mnist(p: FashionMnistParams, seed: int = 0) -> Splits:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey; torchvision's files or Debian's package)."""
    folder, files = _fmnist_folder(Path(p.root).expanduser(), p.download)
    train_x, train_y, test_x, test_y = (_read_idx(f) for f in files)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise UsageError(f"fashion-mnist: image and label counts differ in {folder}")
    train_x, test_x = _resize_uint8(train_x[:, None], p.image_size), _resize_uint8(test_x[:, None], p.image_size)
    train_y, test_y = train_y.astype(np.int64), test_y.astype(np.int64)
    normalize = Normalize(*FMNIST_MEAN_STD)
    eval_tf = Pipeline(normalize)
    train_tf = Pipeline(RandomPadCropFlip(p.image_size, max(1, p.image_size // 14)), normalize) \
        if p.augment else eval_tf
    train, val, info = hold_out(ArrayImages(train_x, train_y, train_tf), ArrayImages(train_x, train_y, eval_tf),
                                 len(train_y), p, seed, "fashion-mnist's training set")
    return Splits(train, val, ArrayImages(test_x, test_y, eval_tf), 10, 1, p.image_size,
                  {"files": absolute_path(folder), "files_sha256": files_sha256(files),
                   "train_transform": repr(train_tf), "eval_transform": repr(eval_tf), **info})
