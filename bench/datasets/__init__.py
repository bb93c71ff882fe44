"""Datasets with honest train / val / test splits; importing this package registers every dataset in DATASETS.

splits.py holds what every dataset shares (DataParams, the seeded val hold-out, the loaders), images.py the
transforms and dataset views, and each other module one dataset family; check.py is `exitbench data check`.
"""

from bench.datasets import cifar, digits, fashion_mnist, imagenet, synthetic  # noqa: F401  (each registers)
from bench.datasets.cifar import CIFAR_MEAN_STD, CifarParams, CifarUnpickler, load_cifar_batch  # noqa: F401
from bench.datasets.digits import DigitsParams  # noqa: F401
from bench.datasets.fashion_mnist import FMNIST_MEAN_STD, FashionMnistParams  # noqa: F401
from bench.datasets.imagenet import IMAGENET_MEAN_STD, ImageNetParams, TinyImageNetParams  # noqa: F401
from bench.datasets.images import (  # noqa: F401
    ArrayImages,
    FileImages,
    Normalize,
    Pipeline,
    RandomPadCropFlip,
    ToArray,
)
from bench.datasets.splits import DataBundle, DataParams, Splits, build, heldout_split, make_splits  # noqa: F401
from bench.datasets.synthetic import SyntheticParams  # noqa: F401
