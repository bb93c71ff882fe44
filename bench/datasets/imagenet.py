"""imagenet and tiny-imagenet: ImageFolder trees (and tiny-ImageNet's official val layout), one scan each."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from bench.datasets.images import FileImages, Normalize, Pipeline, RandomPadCropFlip, ToArray, absolute_path
from bench.datasets.splits import DataParams, Splits, hold_out
from bench.errors import UsageError
from bench.registry import DATASETS

IMAGENET_MEAN_STD = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _scan_folder(name: str, folder: Path, class_to_idx: dict[str, int] | None = None
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ImageFolder layout (folder/CLASS/**/IMAGE) -> (classes, relative paths as bytes array, labels int64).

    Sorted at every level so the order (and so the val permutation) is the same on every machine."""
    if not folder.is_dir():
        raise UsageError(f"{name}: folder {absolute_path(folder)} does not exist; set data.root=DIR holding "
                         f"train/ and val/")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise UsageError(f"{name}: {absolute_path(folder)} holds no class folders; expected CLASS/IMAGE files "
                         f"(ImageFolder layout) under it")
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in classes if c not in class_to_idx]
    if unknown:
        raise UsageError(f"{name}: {absolute_path(folder)} has classes the training folder lacks: "
                         f"{', '.join(unknown[:5])}")
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
            raise UsageError(f"{name}: class folder {absolute_path(folder / c)} holds no images "
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
            raise UsageError(f"{name}: {absolute_path(folder / 'val_annotations.txt')} line {line_no}: expected "
                             f"'FILE<TAB>WNID...' with a WNID of train/, got {line[:60]!r}")
        paths.append(os.fsencode(parts[0]))
        labels.append(class_to_idx[parts[1]])
    if not paths:
        raise UsageError(f"{name}: {absolute_path(folder / 'val_annotations.txt')} lists no images")
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
    raise UsageError(f"{name}: no train/ folder in {' or '.join(absolute_path(c) for c in candidates)}; "
                     f"set data.root=DIR "
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
            raise UsageError(f"{name}: no val/ folder next to {absolute_path(root / 'train')}: the test split is the "
                             f"official val set, as class folders val/CLASS/IMAGE")
        _, test_paths, test_labels = _scan_folder(name, val_dir, class_to_idx)
        test_folder = val_dir
    # One scan, two views: the eval view reads the same files with evaluation transforms.
    train_view = FileImages(root / "train", paths, labels, train_tf)
    eval_view = FileImages(root / "train", paths, labels, eval_tf)
    train, val, info = hold_out(train_view, eval_view, len(labels), p, seed, f"{name}'s train/ folder")
    files_sha1 = hashlib.sha1(b"\n".join(paths.tolist()) + labels.tobytes()).hexdigest()
    return Splits(train, val, FileImages(test_folder, test_paths, test_labels, eval_tf), len(classes), 3, image_size,
                  {"files": absolute_path(root), "train_files_sha1": files_sha1, "train_transform": repr(train_tf),
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
