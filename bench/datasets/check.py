"""`exitbench data check`: build a dataset's splits and say what they hold."""

from __future__ import annotations

import json
from typing import Any

from bench.datasets.splits import make_splits
from bench.errors import UsageError
from bench.registry import DATASETS


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
