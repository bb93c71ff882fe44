"""Datasets: honest splits, evaluation transforms on val, file layouts (written here), bad input."""

import gzip
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import datasets
from bench.datasets import cifar, fashion_mnist
from bench.errors import ConfigError, UsageError
from bench.registry import DATASETS

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------ fixtures


def write_cifar(root: Path, name: str = "cifar10", per_batch: int = 12, test: int = 10, seed: int = 0):
    """Fake CIFAR python batches in torchvision's layout; returns (train images N x 3 x 32 x 32, labels)."""
    rng = np.random.default_rng(seed)
    sub, train_files, test_files, label_key = cifar._CIFAR_FILES[name]
    folder = root / sub
    folder.mkdir(parents=True)
    classes = 10 if name == "cifar10" else 100
    all_x, all_y = [], []
    for f in train_files + test_files:
        n = test if f in test_files else per_batch * (5 if name == "cifar100" else 1)
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, classes, n).tolist()
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": x, label_key: y, "filenames": [f"{i}.png" for i in range(n)]}, fh)
        if f in train_files:
            all_x.append(x.reshape(-1, 3, 32, 32))
            all_y.extend(y)
    return np.concatenate(all_x), np.array(all_y)


def write_image_folder(folder: Path, classes: dict[str, int], size=(40, 30), ext="png", nested=""):
    rng = np.random.default_rng(len(classes))
    for c, n in classes.items():
        (folder / c / nested).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = size[0] + i, size[1] + 2 * i  # varied sizes exercise Resize/CenterCrop
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / c / nested / f"{i}.{ext}")


def write_idx(path: Path, array: np.ndarray):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def splits(name, seed=0, **values):
    return datasets.make_splits({"name": name, **values}, seed)[2]


def all_augmentations(img: np.ndarray, pad: int, flip: bool = True) -> list[np.ndarray]:
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    crops = [padded[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return crops + [c[:, :, ::-1] for c in crops] if flip else crops


# --------------------------------------------------------------------------------------------------- splits


def test_heldout_split_sizes_disjoint_seeded_and_hashed():
    train, val, digest = datasets.heldout_split(100, 0.2, seed=3)
    assert len(train) == 80 and len(val) == 20
    assert set(train).isdisjoint(val) and sorted({*train, *val}) == list(range(100))
    again = datasets.heldout_split(100, 0.2, seed=3)
    assert np.array_equal(again[1], val) and again[2] == digest
    other = datasets.heldout_split(100, 0.2, seed=4)
    assert not np.array_equal(other[1], val) and other[2] != digest
    assert digest == hashlib.sha1(val.astype(np.int64).tobytes()).hexdigest()
    assert len(datasets.heldout_split(100, 7, seed=0)[1]) == 7  # a count


@pytest.mark.parametrize("val_size, message", [(100, "only 100"), (250, "only 100"), (0.001, "0 val samples"),
                                               (2.5, "neither a count"), (0, "neither a count")])
def test_heldout_split_rejects_bad_sizes(val_size, message):
    with pytest.raises(ConfigError, match=message):
        datasets.heldout_split(100, val_size, seed=0)


def test_params_validate_val_size_and_honest_calibration():
    assert datasets.DataParams(val_size=5000.0).val_size == 5000 and datasets.CifarParams().val_size == 5000
    assert datasets.ImageNetParams().val_size == 50000
    with pytest.raises(UsageError, match="neither a count"):
        DATASETS.params("cifar10", {"val_size": 1.5}, where="data")
    with pytest.raises(UsageError, match="train_on_val"):
        DATASETS.params("digits", {"train_on_val": True}, where="data")
    with pytest.raises(UsageError, match="resize_size"):
        DATASETS.params("imagenet", {"image_size": 300}, where="data")


def test_digits_splits_are_seeded_disjoint_and_recorded():
    a, b, c = splits("digits", seed=0), splits("digits", seed=0), splits("digits", seed=1)
    assert (a.info["train_size"], a.info["val_size"], a.info["test_size"]) == (1213, 135, 449)
    assert set(a.train.indices).isdisjoint(a.val.indices)
    assert len(a.train) + len(a.val) == len(a.train.dataset)
    assert np.array_equal(a.val.indices, b.val.indices) and a.info["val_indices_sha1"] == b.info["val_indices_sha1"]
    assert a.info["val_indices_sha1"] != c.info["val_indices_sha1"]
    # The test split does not depend on the trial seed; split_seed pins the val split across trial seeds.
    assert torch.equal(a.test[0][0], c.test[0][0])
    assert np.array_equal(splits("digits", seed=5, split_seed=0).val.indices, a.val.indices)
    assert a.val.dataset is not a.train.dataset and a.in_channels == 1 and a.image_size == 16


def test_train_subset_is_a_seeded_subset_of_the_training_images_left_after_val():
    full, sub = splits("digits", seed=3), splits("digits", seed=3, train_subset=200)
    # Written out: the val permutation (seed 3) leaves these images; the subset is a permutation (seed 4) of them.
    left = np.sort(np.random.default_rng(3).permutation(1348)[135:])
    want = np.sort(left[np.random.default_rng(4).permutation(len(left))[:200]])
    assert np.array_equal(full.train.indices, left) and np.array_equal(sub.train.indices, want)
    assert np.array_equal(sub.val.indices, full.val.indices)  # val does not move
    assert sub.info["train_size"] == 200 and sub.info["train_subset_sha1"] == hashlib.sha1(
        want.astype(np.int64).tobytes()).hexdigest()
    assert "train_subset_sha1" not in full.info


@pytest.mark.parametrize("value, message", [
    ("5000", "data.train_subset: 5000 is more than the 1213 training images digits' training set leaves after "
             "val; use 1..1213 or null for all"),
    ("0", "train_subset"),
])
def test_train_subset_bad_values_are_one_line_exit_2(run_cli, value, message):
    code, out, err = run_cli("data", "check", "digits", f"train_subset={value}")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err and "Traceback" not in err


def test_digits_augment_shifts_train_only():
    s = splits("digits", augment=True, image_size=16)
    i = 0
    raw = s.train.dataset.images[s.train.indices[i]]
    expected = [(x - 0.3) / 0.4 for x in all_augmentations(raw, 2, flip=False)]
    draws = [s.train[i][0].numpy() for _ in range(12)]
    assert all(any(np.allclose(d, e, atol=1e-5) for e in expected) for d in draws)
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    v = s.val.indices[0]
    assert np.allclose(s.val[0][0].numpy(), (s.val.dataset.images[v] - 0.3) / 0.4, atol=1e-6)


def test_build_loaders_calibration_flag_and_train_on_val():
    bundle = datasets.build({"name": "digits", "val_size": 100}, batch_size=64, seed=0)
    assert bundle.info["calibration"] == "heldout" and bundle.info["calibration_flagged"] is False
    assert bundle.calib is bundle.val and bundle.train.drop_last and not bundle.val.drop_last
    x, y = next(iter(bundle.train))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sum(len(b[1]) for b in bundle.val) == 100 and bundle.train.generator is not None
    for calibration in ("train", "test"):
        b = datasets.build({"name": "digits", "calibration": calibration}, batch_size=64)
        assert b.info["calibration_flagged"] is True and b.calib is getattr(b, calibration)
    full = datasets.build({"name": "digits", "calibration": "train", "train_on_val": True, "val_size": 100}, 64)
    assert full.info["train_size"] == 1348 and full.info["val_in_train"] is True


def test_synthetic_any_size_and_classes():
    s = splits("synthetic", num_classes=3, image_size=8, channels=2, train_size=50, test_size=20, val_size=10)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (40, 10, 20, 3)
    assert s.train[0][0].shape == (2, 8, 8)


# ---------------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_layout_sizes_and_eval_transforms_on_val(tmp_path, name):
    train_x, train_y = write_cifar(tmp_path, name)
    s = splits(name, root=str(tmp_path), val_size=10)
    assert (len(s.train), len(s.val), len(s.test)) == (50, 10, 10) if name == "cifar10" else (290, 10, 10)
    assert s.num_classes == (10 if name == "cifar10" else 100) and (s.in_channels, s.image_size) == (3, 32)
    assert s.info["files"] == str(tmp_path / cifar._CIFAR_FILES[name][0])
    mean, std = (np.array(v, np.float32).reshape(3, 1, 1) for v in datasets.CIFAR_MEAN_STD[name])
    # val: the training images under evaluation transforms (normalise only), the same on every read.
    for k in range(3):
        j = s.val.indices[k]
        x, y = s.val[k]
        assert y == train_y[j] and torch.equal(x, s.val[k][0])
        assert np.allclose(x.numpy(), (train_x[j] / 255.0 - mean) / std, atol=1e-5)
    # train: a zero-padded random 32x32 crop, maybe flipped, of the same image, different across reads.
    j = s.train.indices[0]
    candidates = [(c / 255.0 - mean) / std for c in all_augmentations(train_x[j], 4)]
    draws = [s.train[0][0].numpy() for _ in range(10)]
    assert all(any(np.allclose(d, c, atol=1e-5) for c in candidates) for d in draws)
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    assert s.val.dataset is not s.train.dataset and s.val.dataset.images is s.train.dataset.images  # shared memory


def test_cifar_root_may_be_the_batches_folder(tmp_path):
    write_cifar(tmp_path)
    s = splits("cifar10", root=str(tmp_path / "cifar-10-batches-py"), val_size=0.2)
    assert len(s.val) == 12 and s.info["files"] == str(tmp_path / "cifar-10-batches-py")


def test_cifar_missing_or_broken_files_say_where_and_how(tmp_path):
    with pytest.raises(UsageError, match=r"not found in .*data.root=DIR.*data.download=true") as err:
        splits("cifar10", root=str(tmp_path))
    assert str(tmp_path) in str(err.value)
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match="data_batch_3 is not a CIFAR python batch"):
        splits("cifar10", root=str(tmp_path))


def test_loader_workers_are_seeded(tmp_path):
    write_cifar(tmp_path)
    section = {"name": "cifar10", "root": str(tmp_path), "val_size": 10, "workers": 2}
    first = [next(iter(datasets.build(section, batch_size=8, seed=s).train))[0] for s in (0, 0, 1)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


# -------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_fashion_mnist_reads_idx_files_gz_or_not(tmp_path, suffix):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    train_x = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", train_x)
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", rng.integers(0, 10, 40))
    write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (8, 28, 28)))
    write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", rng.integers(0, 10, 8))
    s = splits("fashion-mnist", root=str(tmp_path), val_size=0.25)
    assert (len(s.train), len(s.val), len(s.test), s.in_channels, s.image_size) == (30, 10, 8, 1, 28)
    assert s.info["files"] == str(raw)
    j = s.val.indices[0]
    assert np.allclose(s.val[0][0].numpy(), (train_x[j][None] / 255.0 - 0.2860) / 0.3530, atol=1e-5)
    assert splits("fashion-mnist", root=str(tmp_path), val_size=0.25, image_size=32).train[0][0].shape == (1, 32, 32)


def test_fashion_mnist_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_FASHION_MNIST_DIRS", [tmp_path / "nowhere"])
    with pytest.raises(UsageError, match=r"`make data` \(as root: apt-get install -y dataset-fashion-mnist\)"):
        splits("fashion-mnist", root=str(tmp_path))


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason=f"Debian's dataset-fashion-mnist is not installed ("
                    f"{DEBIAN_FMNIST} missing; apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_found_in_debian_package(tmp_path):
    s = splits("fashion-mnist", root=str(tmp_path))  # nothing under root: the Debian files are found
    assert s.info["files"] == str(DEBIAN_FMNIST)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    x, y = s.val[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10


# ---------------------------------------------------------------------------------------- ImageNet folders


def test_imagenet_folders_splits_and_eval_transforms(tmp_path):
    from torchvision.transforms import functional as TF

    write_image_folder(tmp_path / "train", {"a": 4, "b": 4, "c": 3})
    write_image_folder(tmp_path / "val", {"a": 2, "b": 1, "c": 2}, ext="JPEG")
    s = splits("imagenet", root=str(tmp_path), val_size=3, image_size=16, resize_size=20)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes, s.image_size) == (8, 3, 5, 3, 16)
    assert set(s.train.indices).isdisjoint(s.val.indices) and s.info["files"] == str(tmp_path)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in datasets.IMAGENET_MEAN_STD)
    for k in range(len(s.val)):  # val: Resize(20) + CenterCrop(16) of the training file, deterministic
        view, j = s.val.dataset, s.val.indices[k]
        img = Image.open(view.path(j)).convert("RGB")
        expected = (TF.to_tensor(TF.center_crop(TF.resize(img, 20), 16)) - mean) / std
        x, y = s.val[k]
        assert torch.allclose(x, expected, atol=1e-5) and y == view.labels[j]
    assert s.train[0][0].shape == s.test[0][0].shape == (3, 16, 16)
    assert "RandomResizedCrop" in s.info["train_transform"] and "CenterCrop" in s.info["eval_transform"]
    assert [s.test.labels[i] for i in range(len(s.test))] == [0, 0, 1, 2, 2]
    assert s.info["train_files_sha1"] == splits("imagenet", root=str(tmp_path), val_size=3).info["train_files_sha1"]


def test_tiny_imagenet_official_val_layout(tmp_path):
    write_image_folder(tmp_path / "tiny-imagenet-200" / "train", {"n01": 3, "n02": 3}, size=(64, 64), ext="JPEG",
                       nested="images")
    val = tmp_path / "tiny-imagenet-200" / "val"
    (val / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate(["n02", "n01", "n02"]):
        Image.new("RGB", (64, 64), (i * 50, 0, 0)).save(val / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    s = splits("tiny-imagenet", root=str(tmp_path), val_size=2)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (4, 2, 3, 2)
    assert [s.test[i][1] for i in range(3)] == [1, 0, 1] and s.test[0][0].shape == (3, 64, 64)
    assert s.info["files"] == str(tmp_path / "tiny-imagenet-200")


@pytest.mark.parametrize("make, message", [
    (lambda r: None, "no train/ folder"),
    (lambda r: (r / "train").mkdir(), "holds no class folders"),
    (lambda r: (r / "train" / "a").mkdir(parents=True), "holds no images"),
    (lambda r: write_image_folder(r / "train", {"a": 2}), "no val/ folder"),
    (lambda r: (write_image_folder(r / "train", {"a": 2}), write_image_folder(r / "val", {"zz": 1})), "lacks: zz"),
])
def test_image_folder_bad_layouts(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UsageError, match=message):
        splits("imagenet", root=str(tmp_path), val_size=1)


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_data_check_digits_offline(run_cli):
    code, out, err = run_cli("data", "check", "digits")
    assert code == 0 and err == ""
    assert "1213" in out and "1 x 16 x 16" in out and "heldout" in out and "load_digits" in out
    code, out, _ = run_cli("data", "check", "digits", "image_size=8", "data.val_size=0.2", "--seed", "2", "--json")
    report = json.loads(out)
    assert code == 0 and report["sample_shape"]["val"] == [1, 8, 8] and report["split_seed"] == 2
    assert report["val_size"] == 270 and report["calibration_flagged"] is False


def test_cli_data_check_flags_calibration(run_cli, tmp_path):
    write_image_folder(tmp_path / "train", {"a": 2, "b": 2})
    write_image_folder(tmp_path / "val", {"a": 1, "b": 1})
    code, out, _ = run_cli("data", "check", "imagenet", f"root={tmp_path}", "val_size=1", "image_size=8",
                           "resize_size=10", "calibration=test", "--json")
    report = json.loads(out)
    assert code == 0 and report["calibration"] == "test" and report["calibration_flagged"] is True
    assert report["files"] == str(tmp_path) and report["sample_shape"]["test"] == [3, 8, 8]


@pytest.mark.parametrize("args, message", [
    (["digits", "val_size=5000"], "only 1348"),
    (["digits", "val_size=1.5"], "neither a count"),
    (["digits", "val_size=0.0001"], "0 val samples"),
    (["digits", "train_on_val=true"], "train_on_val"),
    (["digits", "colour=red"], "unknown field 'data.colour'"),
    (["cifar10", "root={tmp}"], "data.download=true"),
    (["imagenet", "root={tmp}"], "data.root=DIR"),
    (["mnist-but-not"], "unknown dataset"),
])
def test_cli_data_check_bad_input_is_one_line(run_cli, tmp_path, args, message):
    code, out, err = run_cli("data", "check", *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert message in err and "Traceback" not in err
