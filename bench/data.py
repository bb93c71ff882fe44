"""Datasets with honest train / val / test splits.

`build(section, batch_size, seed, device)` returns a DataBundle of three loaders. `val` is held out of the
training set by a seeded permutation (its sha1 goes into `info`) and is served with EVALUATION transforms:
each dataset builds two views over the same images (train transforms, eval transforms) and val is a subset
of the eval view, never of the augmented one. `calibration` picks the split budgeted evaluation calibrates
its thresholds on: `heldout` (val, the honest default), or `train` (L2W-DEN: augmented training images) and
`test` (MSDNet without --use-valid, RANet) to reproduce the reference protocols; those are flagged in `info`.

In-memory sets (CIFAR, Fashion-MNIST, digits) keep one uint8/float array shared by both views and augment it
with numpy (about 10x faster per sample than torchvision's tensor transforms); folder sets (ImageNet,
tiny-ImageNet) scan the folder once and keep the file list as one numpy byte array, so forked workers do not
copy it page by page (Python lists of tuples get their refcounts touched on every read).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from bench.errors import ConfigError, UsageError
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


def _hold_out(train_view: Dataset, eval_view: Dataset, n: int, p: DataParams, seed: int, what: str
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
def _removed_on_failure(root: Path):
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


def _where(path: Path) -> str:
    return str(path.expanduser().absolute())


# ------------------------------------------------------------------------------------------------ synthetic


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
    train, val, info = _hold_out(full, full, len(full), p, seed, "synthetic's training set")
    return Splits(train, val, _synthetic_tensors(p, p.test_size, 2), p.num_classes, p.channels, p.image_size,
                  {"files": "generated (seeded)", "train_transform": "none", "eval_transform": "none", **info})


# --------------------------------------------------------------------------------------------------- digits


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
    train, val, info = _hold_out(train_view, eval_view, len(rest), p, seed, "digits' training set")
    test = ArrayImages(images[test_idx], labels[test_idx], eval_tf)
    return Splits(train, val, test, 10, 1, p.image_size,
                  {"files": "sklearn.datasets.load_digits (bundled)", "train_transform": repr(train_tf),
                   "eval_transform": repr(eval_tf), **info})


# ---------------------------------------------------------------------------------------------------- CIFAR

CIFAR_MEAN_STD = {  # as in MSDNet-PyTorch's dataloader
    "cifar10": ([0.4914, 0.4824, 0.4467], [0.2471, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
}
_CIFAR_FILES = {  # torchvision's layout: folder, train files, test files, label key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


class CifarParams(DataParams):
    val_size: int | float = Field(5000, gt=0, description="held-out val (MSDNet --use-valid: 5,000)")
    download: bool = Field(False, description="download to root with torchvision when the files are missing")
    augment: bool = Field(True, description="RandomCrop(32, padding=4) + HorizontalFlip for training")


def _cifar_folder(name: str, root: Path, download: bool) -> Path:
    sub, train_files, test_files, _ = _CIFAR_FILES[name]
    candidates = [root / sub, root]
    for folder in candidates:
        if all((folder / f).is_file() for f in train_files + test_files):
            return folder
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            with _removed_on_failure(root):
                cls(str(root), train=True, download=True)
        except Exception as err:  # network, disk, checksum: one line for the user
            raise UsageError(f"{name}: download into {_where(root)} failed: {str(err).splitlines()[0]}") from None
        return root / sub
    looked = " and ".join(_where(c) for c in candidates)
    raise UsageError(f"{name}: CIFAR python batches ({', '.join(train_files + test_files)}) not found in {looked}; "
                     f"set data.root=DIR (the folder holding {sub}/) or data.download=true")


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """`_codecs.encode` as pickle protocol 2 uses it for bytes, and for nothing else."""
    if encoding.replace("-", "").lower() not in ("latin1", "latin", "iso88591") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not part of a CIFAR batch")
    return text.encode("latin1", errors)


def _plain_dtype(*args, **kwargs) -> np.dtype:
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:  # object arrays unpickle arbitrary objects of their own
        raise pickle.UnpicklingError(f"numpy dtype {dtype} (holds Python objects) is not part of a CIFAR batch")
    return dtype


class CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR python batches without running code from the file: a batch is a dict of lists, str/bytes,
    ints and uint8 numpy arrays, so the only globals admitted are those that rebuild a plain numpy array
    (and `_codecs.encode` for latin-1 bytes, as protocol 2 writes them). Anything else (a `__reduce__` that
    calls os.system, an object array) is refused before it is called."""

    def find_class(self, module: str, name: str):
        reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): _plain_dtype,
            ("_codecs", "encode"): _latin1_encode,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not part of a CIFAR batch")
        return allowed[(module, name)]


def load_cifar_batch(data: bytes) -> Any:
    """One CIFAR python batch (a pickle) read with CifarUnpickler."""
    return CifarUnpickler(io.BytesIO(data), encoding="latin1").load()


def _read_cifar(name: str, folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        try:
            batch = load_cifar_batch((folder / f).read_bytes())
            if not isinstance(batch, dict):
                raise ValueError(f"holds a {type(batch).__name__}, not a dict")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError) as err:
            raise UsageError(f"{name}: {_where(folder / f)} is not a CIFAR python batch ({type(err).__name__}: "
                             f"{err}); re-download it (data.download=true after removing the folder)") from None
    return np.concatenate(images), np.concatenate(labels)


def _cifar(name: str, p: CifarParams, seed: int) -> Splits:
    folder = _cifar_folder(name, Path(p.root).expanduser(), p.download)
    _, train_files, test_files, label_key = _CIFAR_FILES[name]
    train_x, train_y = _read_cifar(name, folder, train_files, label_key)
    test_x, test_y = _read_cifar(name, folder, test_files, label_key)
    normalize = Normalize(*CIFAR_MEAN_STD[name])
    eval_tf = Pipeline(normalize)
    train_tf = Pipeline(RandomPadCropFlip(32, 4), normalize) if p.augment else eval_tf
    train, val, info = _hold_out(ArrayImages(train_x, train_y, train_tf), ArrayImages(train_x, train_y, eval_tf),
                                 len(train_y), p, seed, f"{name}'s training set")
    return Splits(train, val, ArrayImages(test_x, test_y, eval_tf), 10 if name == "cifar10" else 100, 3, 32,
                  {"files": _where(folder), "train_transform": repr(train_tf), "eval_transform": repr(eval_tf),
                   **info})


@DATASETS.register("cifar10", CifarParams)
def cifar10(p: CifarParams, seed: int = 0) -> Splits:
    """CIFAR-10 (50,000 train / 10,000 test, 32x32, torchvision's python batches)."""
    return _cifar("cifar10", p, seed)


@DATASETS.register("cifar100", CifarParams)
def cifar100(p: CifarParams, seed: int = 0) -> Splits:
    """CIFAR-100 (50,000 train / 10,000 test, 32x32, fine labels, torchvision's python batches)."""
    return _cifar("cifar100", p, seed)


# -------------------------------------------------------------------------------------------- Fashion-MNIST

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
            with _removed_on_failure(root):
                for train in (True, False):
                    torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
        except Exception as err:
            raise UsageError(f"fashion-mnist: download into {_where(root)} failed: {str(err).splitlines()[0]}"
                             ) from None
        return _fmnist_folder(root, False)
    looked = ", ".join(_where(c) for c in candidates)
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
    train, val, info = _hold_out(ArrayImages(train_x, train_y, train_tf), ArrayImages(train_x, train_y, eval_tf),
                                 len(train_y), p, seed, "fashion-mnist's training set")
    return Splits(train, val, ArrayImages(test_x, test_y, eval_tf), 10, 1, p.image_size,
                  {"files": _where(folder), "train_transform": repr(train_tf), "eval_transform": repr(eval_tf),
                   **info})


# ------------------------------------------------------------------------------------- ImageNet (folders)

IMAGENET_MEAN_STD = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _scan_folder(name: str, folder: Path, class_to_idx: dict[str, int] | None = None
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ImageFolder layout (folder/CLASS/**/IMAGE) -> (classes, relative paths as bytes array, labels int64).

    Sorted at every level so the order (and so the val permutation) is the same on every machine."""
    if not folder.is_dir():
        raise UsageError(f"{name}: folder {_where(folder)} does not exist; set data.root=DIR holding train/ and val/")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise UsageError(f"{name}: {_where(folder)} holds no class folders; expected CLASS/IMAGE files "
                         f"(ImageFolder layout) under it")
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in classes if c not in class_to_idx]
    if unknown:
        raise UsageError(f"{name}: {_where(folder)} has classes the training folder lacks: {', '.join(unknown[:5])}")
    paths: list[bytes] = []
    labels: list[int] = []
    for c in classes:
        count = 0
        for dirpath, dirnames, filenames in os.walk(folder / c, followlinks=True):
            dirnames.sort()
            rel = os.path.relpath(dirpath, folder)
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.fsencode(os.path.join(rel, f)))
                    count += 1
        if count == 0:
            raise UsageError(f"{name}: class folder {_where(folder / c)} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        labels.extend([class_to_idx[c]] * count)
    return classes, np.array(paths), np.array(labels, dtype=np.int64)


def _scan_tiny_val(name: str, folder: Path, class_to_idx: dict[str, int]) -> tuple[Path, np.ndarray, np.ndarray]:
    """tiny-ImageNet's official val layout: val/images/*.JPEG + val/val_annotations.txt (file, wnid, box)."""
    paths, labels = [], []
    for line_no, line in enumerate((folder / "val_annotations.txt").read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in class_to_idx:
            raise UsageError(f"{name}: {_where(folder / 'val_annotations.txt')} line {line_no}: expected "
                             f"'FILE<TAB>WNID...' with a WNID of train/, got {line[:60]!r}")
        paths.append(os.fsencode(parts[0]))
        labels.append(class_to_idx[parts[1]])
    if not paths:
        raise UsageError(f"{name}: {_where(folder / 'val_annotations.txt')} lists no images")
    return folder / "images", np.array(paths), np.array(labels, dtype=np.int64)


class ImageNetParams(DataParams):
    val_size: int | float = Field(50000, gt=0, description="held-out val (MSDNet --use-valid: 50,000)")
    image_size: int = Field(224, ge=8, description="crop size for training and evaluation")
    resize_size: int = Field(256, ge=8, description="evaluation: resize the short side to this, then center-crop")
    workers: int = Field(8, ge=0, description="loader worker processes per split (JPEG decoding is the cost)")

    @model_validator(mode="after")
    def _sizes(self):
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than image_size {self.image_size}")
        return self


class TinyImageNetParams(DataParams):
    val_size: int | float = Field(10000, gt=0, description="held-out val (as large as the official val split)")
    image_size: int = Field(64, ge=8, description="images are 64x64; other sizes resize them (bilinear)")
    augment: bool = Field(True, description="RandomCrop(size, padding=size/8) + HorizontalFlip for training")
    workers: int = Field(4, ge=0, description="loader worker processes per split")


def _folder_root(name: str, root: Path, subs: Sequence[str]) -> Path:
    candidates = [root / s for s in subs] + [root]
    for folder in candidates:
        if (folder / "train").is_dir():
            return folder
    raise UsageError(f"{name}: no train/ folder in {' or '.join(_where(c) for c in candidates)}; set data.root=DIR "
                     f"holding train/ and val/ class folders (there is no download for {name})")


def _folder_splits(name: str, p: DataParams, seed: int, root: Path, train_tf: Callable, eval_tf: Callable,
                   image_size: int, tiny_val: bool) -> Splits:
    classes, paths, labels = _scan_folder(name, root / "train")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    val_dir = root / "val"
    if tiny_val and (val_dir / "val_annotations.txt").is_file():
        test_folder, test_paths, test_labels = _scan_tiny_val(name, val_dir, class_to_idx)
    else:
        if not val_dir.is_dir():
            raise UsageError(f"{name}: no val/ folder next to {_where(root / 'train')}: the test split is the "
                             f"official val set, as class folders val/CLASS/IMAGE")
        _, test_paths, test_labels = _scan_folder(name, val_dir, class_to_idx)
        test_folder = val_dir
    # One scan, two views: the eval view reads the same files with evaluation transforms.
    train_view = FileImages(root / "train", paths, labels, train_tf)
    eval_view = FileImages(root / "train", paths, labels, eval_tf)
    train, val, info = _hold_out(train_view, eval_view, len(labels), p, seed, f"{name}'s train/ folder")
    files_sha1 = hashlib.sha1(b"\n".join(paths.tolist()) + labels.tobytes()).hexdigest()
    return Splits(train, val, FileImages(test_folder, test_paths, test_labels, eval_tf), len(classes), 3, image_size,
                  {"files": _where(root), "train_files_sha1": files_sha1, "train_transform": repr(train_tf),
                   "eval_transform": repr(eval_tf), **info})


@DATASETS.register("imagenet", ImageNetParams)
def imagenet(p: ImageNetParams, seed: int = 0) -> Splits:
    """ImageNet as ImageFolder trees root/train/CLASS/*.JPEG and root/val/CLASS/*.JPEG (val is the test split)."""
    from torchvision import transforms as T

    normalize = Normalize(*IMAGENET_MEAN_STD)
    train_tf = Pipeline(T.RandomResizedCrop(p.image_size), T.RandomHorizontalFlip(), ToArray(), normalize)
    eval_tf = Pipeline(T.Resize(p.resize_size), T.CenterCrop(p.image_size), ToArray(), normalize)
    root = _folder_root("imagenet", Path(p.root).expanduser(), ["imagenet", "ILSVRC2012"])
    return _folder_splits("imagenet", p, seed, root, train_tf, eval_tf, p.image_size, tiny_val=False)


@DATASETS.register("tiny-imagenet", TinyImageNetParams)
def tiny_imagenet(p: TinyImageNetParams, seed: int = 0) -> Splits:
    """tiny-ImageNet-200 (100,000 train / 10,000 val as test, 64x64): class folders or the official val layout."""
    from torchvision import transforms as T

    normalize = Normalize(*IMAGENET_MEAN_STD)
    pre = (ToArray(),) if p.image_size == 64 else (T.Resize((p.image_size, p.image_size)), ToArray())
    eval_tf = Pipeline(*pre, normalize)
    train_tf = Pipeline(*pre, RandomPadCropFlip(p.image_size, p.image_size // 8), normalize) if p.augment \
        else eval_tf
    root = _folder_root("tiny-imagenet", Path(p.root).expanduser(), ["tiny-imagenet-200", "tiny-imagenet"])
    return _folder_splits("tiny-imagenet", p, seed, root, train_tf, eval_tf, p.image_size, tiny_val=True)


# --------------------------------------------------------------------------------------------------- loaders


def _seed_worker(worker_id: int) -> None:
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
                  worker_init_fn=_seed_worker if params.workers > 0 else None)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(splits.train, batch_size=batch_size, shuffle=True, drop_last=len(splits.train) > batch_size,
                       generator=g, **common)
    val = DataLoader(splits.val, batch_size=batch_size, shuffle=False, **common)
    test = DataLoader(splits.test, batch_size=batch_size, shuffle=False, **common)
    info = {**splits.info, "batch_size": batch_size, "workers": params.workers}
    return DataBundle(train, val, test, params.calibration, splits.num_classes, splits.in_channels,
                      splits.image_size, info)


# ------------------------------------------------------------------------------------------------------ CLI


def cli_check(args) -> int:
    """`exitbench data check DATASET [KEY=VALUE...] [--json]`: build the splits, read one sample of each."""
    from bench.config import parse_overrides

    values: dict[str, Any] = {}
    for key, value in parse_overrides(args.options):
        key = key.removeprefix("data.")
        if "." in key:
            raise UsageError(f"dataset option {key!r} is not a plain KEY=VALUE (e.g. root=/data val_size=5000)")
        values[key] = value
    DATASETS.get(args.dataset)  # unknown name -> one line listing the valid ones
    _, _, splits = make_splits({"name": args.dataset, **values}, args.seed)
    shapes = {}
    for split in ("train", "val", "test"):
        try:
            x, _ = getattr(splits, split)[0]
        except (OSError, ValueError) as err:
            raise UsageError(f"{args.dataset}: cannot read the first {split} sample: {err}") from None
        shapes[split] = list(x.shape)
    report = {**splits.info, "sample_shape": shapes}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    # make_splits sets the common facts; the rest are what the built-in datasets add (a user's may not).
    info = {"files": "(not reported by this dataset)", "val_indices_sha1": "?", "val_in_train": False,
            "train_transform": "(not reported)", "eval_transform": "(not reported)", **splits.info}
    seed_note = f"seed {info['split_seed']}, sha1 {info['val_indices_sha1'][:12]}"
    val_note = "inside train (train_on_val)" if info["val_in_train"] else "held out of train"
    calib_from = {"heldout": "val", "train": "the augmented training split (flagged)",
                  "test": "the test split (flagged)"}[info["calibration"]]
    rows = [
        ("dataset", info["dataset"]),
        ("files", info["files"]),
        ("classes", info["num_classes"]),
        ("image shape", " x ".join(map(str, shapes["val"])) + " (channels x height x width)"),
        ("train", f"{info['train_size']}" + (f" (seeded subset, data.train_subset; sha1 "
                                              f"{info['train_subset_sha1'][:12]})" if "train_subset_sha1" in info
                                              else "")),
        ("val", f"{info['val_size']} ({val_note}, {seed_note}; evaluation transforms)"),
        ("test", info["test_size"]),
        ("calibration", f"{info['calibration']}: thresholds from {calib_from}"),
        ("train transform", info["train_transform"]),
        ("eval transform", info["eval_transform"]),
    ]
    for key, value in rows:
        print(f"{key:<16} {value}")
    return 0
