"""The committed results are what today's code gives: one trial of each committed sweep, re-run from the config
its store recorded, ends its first epoch on the stored first-epoch numbers, exactly. Same seed, same device:
same numbers; a machine of another kind (CPU model, instruction set, math libraries) sums floats in another
order, so there the check is skipped with the reason, never loosened."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from bench import results
from bench.config import set_path, validate_trial
from bench.trial import train
from bench.trial.provenance import machine

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = {"default": "uniform", "fashion-mnist": "uniform"}  # committed sweep -> the method of its re-run trial
TIMES = ("time_s", "images_per_s")  # wall-clock columns: the only ones allowed to differ


class FirstEpochDone(Exception):
    pass


def stop_after_first_epoch(row, run_dir):
    raise FirstEpochDone


def stored_config(row) -> dict:
    """A trial's config from its runs row: `config.*` columns back into sections (lists are stored as JSON
    text; columns another method's trials added are empty for this one)."""
    config: dict = {}
    for column, value in row.items():
        if not column.startswith("config.") or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, str) and value.startswith("["):
            value = json.loads(value)
        set_path(config, column.removeprefix("config."), value)
    return config


@pytest.mark.parametrize("sweep,method", SWEEPS.items())
def test_a_committed_trial_reruns_to_its_stored_first_epoch(sweep, method, tmp_path):
    shutil.copytree(ROOT / "results" / sweep / "store", tmp_path / sweep / "store")  # nothing written beside it
    tables = results.load(tmp_path / sweep, ["runs", "epochs"])
    runs = tables.runs[(tables.runs["status"] == "finished") & (tables.runs["config.method.name"] == method)]
    row = runs.sort_values("seed").iloc[0]
    recorded = {k: row.get(f"machine.{k}") for k in ("cpu", "cpu_capability", "math")}
    if recorded["cpu"] is None:
        pytest.skip(f"results/{sweep} was produced before trials recorded their machine; `make results` redoes it")
    here = machine("cpu")
    if any(recorded[k] != here[k] for k in recorded):
        pytest.skip(f"results/{sweep} was produced on {recorded}; this machine is {here}")
    cfg = validate_trial(stored_config(row))
    if cfg.data["name"] == "fashion-mnist" and not Path("/usr/share/datasets/fashion-mnist").is_dir() \
            and "root" not in cfg.data:
        pytest.skip("Fashion-MNIST is not installed here (`make data`)")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(FirstEpochDone):
            train.run(cfg, tmp_path / "again", on_epoch=stop_after_first_epoch, resume=False)
    finally:
        torch.set_num_threads(threads)
    again = json.loads((tmp_path / "again" / "metrics.jsonl").read_text().splitlines()[0])
    stored = tables.epochs[(tables.epochs["trial_id"] == row["trial_id"]) & (tables.epochs["epoch"] == 1)]
    stored = {k: v.item() if hasattr(v, "item") else v for k, v in stored.iloc[0].items()
              if k != "trial_id" and not (isinstance(v, float) and math.isnan(v))}
    assert {k: v for k, v in again.items() if k not in TIMES} == {k: v for k, v in stored.items() if k not in TIMES}


def test_the_stored_config_comes_back_whole():
    """The reconstruction the drift check relies on: a config through the store's runs row and back."""
    raw = {"data": {"name": "digits", "image_size": 8}, "backbone": {"name": "tiny", "widths": [4, 8]},
           "method": {"name": "distill", "temperature": 3.0}, "epochs": 2, "seed": 5}
    cfg = validate_trial(raw)
    record = results.ResultRecord(trial_id="t", config=cfg.model_dump(mode="json"), seed=5)
    row = results.to_tables(record)["runs"].iloc[0]
    assert validate_trial(stored_config(row)) == cfg
