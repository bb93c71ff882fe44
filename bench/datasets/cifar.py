"""cifar10 and cifar100: torchvision's python batches, read by an unpickler that runs no code from the file."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
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
            with removed_on_failure(root):
                cls(str(root), train=True, download=True)
        except Exception as err:  # network, disk, checksum: one line for the user
            raise UsageError(f"{name}: download into {absolute_path(root)} failed: "
                             f"{str(err).splitlines()[0]}") from None
        return root / sub
    looked = " and ".join(absolute_path(c) for c in candidates)
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
            raise UsageError(f"{name}: {absolute_path(folder / f)} is not a CIFAR python batch ({type(err).__name__}: "
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
    train, val, info = hold_out(ArrayImages(train_x, train_y, train_tf), ArrayImages(train_x, train_y, eval_tf),
                                 len(train_y), p, seed, f"{name}'s training set")
    return Splits(train, val, ArrayImages(test_x, test_y, eval_tf), 10 if name == "cifar10" else 100, 3, 32,
                  {"files": absolute_path(folder),
                   "files_sha256": files_sha256([folder / f for f in train_files + test_files]),
                   "train_transform": repr(train_tf), "eval_transform": repr(eval_tf),
                   **info})


@DATASETS.register("cifar10", CifarParams)
def cifar10(p: CifarParams, seed: int = 0) -> Splits:
    """CIFAR-10 (50,000 train / 10,000 test, 32x32, torchvision's python batches)."""
    return _cifar("cifar10", p, seed)


@DATASETS.register("cifar100", CifarParams)
def cifar100(p: CifarParams, seed: int = 0) -> Splits:
    """CIFAR-100 (50,000 train / 10,000 test, 32x32, fine labels, torchvision's python batches)."""
    return _cifar("cifar100", p, seed)
