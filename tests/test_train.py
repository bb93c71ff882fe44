import json
import math

import pytest
import torch

from bench.config import ScheduleConfig, validate_trial
from bench.trial import train

TINY = {
    "data": {"name": "synthetic", "num_classes": 4, "image_size": 8, "train_size": 96, "test_size": 40,
             "val_size": 0.25},
    "backbone": {"name": "tiny", "widths": [4, 8]},
    "epochs": 3,
    "batch_size": 16,
    "progress": False,
    "deterministic": True,
}


def tiny_cfg(tmp_path, **changes):
    raw = json.loads(json.dumps(TINY))
    raw["out_dir"] = str(tmp_path / "run")
    for key, value in changes.items():
        raw[key] = value
    return validate_trial(raw)


def test_run_writes_folder_and_record(tmp_path):
    cfg = tiny_cfg(tmp_path)
    record = train.run(cfg)
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "checkpoint.pt", "metrics.jsonl", "logits.pt", "result.json"):
        assert (run_dir / name).is_file(), name
    assert record.status == "finished" and record.seed == 0 and record.calibration == "heldout"
    assert len(record.epochs) == 3 and [e["epoch"] for e in record.epochs] == [1, 2, 3]
    assert len(record.exits) == 2 and record.exits[0]["macs"] < record.exits[1]["macs"]
    assert record.exits[0]["params"] < record.exits[1]["params"]
    assert len(record.budgets) == 39
    assert record.versions["torch"] == torch.__version__.split("+")[0] or record.versions["torch"]
    assert record.counter and record.train_images_per_s > 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    logits = torch.load(run_dir / "logits.pt", weights_only=True)
    assert logits["test_logits"].shape == (2, 40, 4) and logits["val_logits"].shape[1] == 24


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = train.run(tiny_cfg(tmp_path / "a"))

    class Crash(Exception):
        pass

    def crash_after_first(row, run_dir):
        if row["epoch"] == 1:
            raise Crash

    cfg = tiny_cfg(tmp_path / "b")
    with pytest.raises(Crash):
        train.run(cfg, on_epoch=crash_after_first)
    assert torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = train.run(cfg)
    strip = ("time_s", "images_per_s")
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed.epochs] == \
           [{k: v for k, v in e.items() if k not in strip} for e in full.epochs]
    assert resumed.exits == full.exits
    assert resumed.budgets == full.budgets


def test_nan_loss_names_epoch_and_iteration(tmp_path):
    cfg = tiny_cfg(tmp_path, data={**TINY["data"], "noise": math.inf})
    with pytest.raises(train.TrainingDiverged, match=r"epoch 1, iteration 1"):
        train.run(cfg)


@pytest.mark.parametrize(
    "schedule, iteration, expected",
    [
        ({"name": "multistep"}, 0, 1.0),
        ({"name": "multistep"}, 49, 1.0),  # epoch 4 of 10 (10 steps per epoch)
        ({"name": "multistep"}, 50, 0.1),  # epoch 5 = 50 % of 10
        ({"name": "multistep"}, 75, 0.1),  # epoch 7 < 7.5: MSDNet drops again only from epoch 8
        ({"name": "multistep"}, 80, 0.01),
        ({"name": "cosine"}, 0, 1.0),
        ({"name": "cosine"}, 50, 0.5),
        ({"name": "cosine"}, 99, 0.5 * (1 + math.cos(math.pi * 99 / 100))),
        ({"name": "constant", "warmup_epochs": 1}, 4, 0.5),
        ({"name": "constant", "warmup_epochs": 1}, 10, 1.0),
    ],
)
def test_lr_schedule(schedule, iteration, expected):
    assert train.lr_factor(ScheduleConfig(**schedule), iteration, 100, 10) == pytest.approx(expected)


def test_cli_train_and_evaluate(run_cli, tmp_path):
    path = tmp_path / "t.yaml"
    cfg = dict(TINY, epochs=1, out_dir=str(tmp_path / "run"))
    path.write_text(json.dumps(cfg))
    code, out, err = run_cli("train", path)
    assert code == 0, err
    assert "last exit: top-1" in out
    code, out, err = run_cli("train", path)
    assert code == 2 and "--resume" in err and err.count("\n") == 1
    code, out, err = run_cli("evaluate", tmp_path / "run", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["budgets"]) == 39 and len(report["anytime"]) == 2
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert report["anytime"][-1]["top1"] == pytest.approx(saved["exits"][-1]["top1"])


def test_cli_train_bad_input_writes_nothing(run_cli, tmp_path):
    code, _, err = run_cli("train", f"out_dir={tmp_path / 'run'}", "optim.lr=-1")
    assert code == 2 and "optim.lr" in err and not (tmp_path / "run").exists()
    code, _, err = run_cli("train", f"out_dir={tmp_path / 'run'}", "--resume")
    assert code == 2 and "no checkpoint" in err
    code, _, err = run_cli("evaluate", tmp_path / "nothing")
    assert code == 2 and "no checkpoint" in err
