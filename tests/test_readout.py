"""Readouts (bench/readout.py) through the whole pipeline: causality, training, checkpoint, logits.pt,
`exitbench evaluate`, `exitbench budget`, the threshold sweep, resume; and a sweep over every strategy."""

import json

import pytest
import torch
import yaml

from bench import results
from bench.config import validate_trial
from bench.evaluate import protocol
from bench.readout import Readout, build_readout, check_causal, readout_macs, readout_outputs
from bench.trial import train

TINY = {
    "data": {"name": "synthetic", "num_classes": 4, "image_size": 8, "train_size": 96, "test_size": 40,
             "val_size": 0.25},
    "backbone": {"name": "tiny", "widths": [4, 8, 8]},
    "epochs": 2,
    "batch_size": 16,
    "progress": False,
    "deterministic": True,
}


def tiny_cfg(tmp_path, method, **changes):
    raw = json.loads(json.dumps(TINY))
    raw.update(out_dir=str(tmp_path / "run"), method=method, **changes)
    return validate_trial(raw)


class PeeksAhead(Readout):
    """A wrong readout: exit 1 adds what the last exit saw on the previous call."""

    def __init__(self, num_exits, num_classes):
        super().__init__(num_exits, num_classes)
        self.memory = torch.zeros(num_classes)

    def exit(self, k, logits, carry):
        if k == self.num_exits - 1:
            self.memory = logits[0].clone()
        return (logits + self.memory if k == 0 else logits), carry


def test_an_exit_that_reads_a_later_exit_is_refused():
    with pytest.raises(AssertionError, match="exit 1's output changed when exits 2..3 changed"):
        check_causal(PeeksAhead(3, 4))


@pytest.mark.parametrize("method", [{"name": "uniform"}, {"name": "boosted"}, {"name": "ztw"}])
def test_changing_later_exits_never_changes_earlier_outputs(method):
    torch.manual_seed(0)
    readout = build_readout(method, 4, 6)
    with torch.no_grad():
        for p in readout.parameters():
            p.copy_(torch.randn_like(p))
        logits = [torch.randn(5, 6) for _ in range(4)]
        before = readout_outputs(readout, logits)
        for k in range(3):
            changed = logits[:k + 1] + [torch.randn(5, 6) * 10 for _ in range(3 - k)]
            after = readout_outputs(readout, changed)
            for j in range(k + 1):
                assert torch.equal(after[j], before[j])
            assert not torch.equal(after[-1], before[-1])


def test_boosted_run_evaluates_through_its_readout_everywhere(tmp_path, run_cli):
    cfg = tiny_cfg(tmp_path, {"name": "boosted"})
    record = train.run(cfg)
    run_dir = tmp_path / "run"
    saved = torch.load(run_dir / "logits.pt", weights_only=True)
    # logits.pt: the readout outputs (used for every metric) and the raw exits beside them
    assert {"val_raw_logits", "test_raw_logits", "readout_macs"} <= set(saved)
    readout = build_readout(cfg.method, 3, 4)
    for split in ("val", "test"):
        raw = list(saved[f"{split}_raw_logits"])
        expected = torch.stack([raw[0], raw[1] + 0.5 * raw[0], raw[2] + 0.5 * raw[1] + 0.25 * raw[0]])
        torch.testing.assert_close(saved[f"{split}_logits"], expected)
        torch.testing.assert_close(saved[f"{split}_logits"], torch.stack(readout_outputs(readout, raw)))
    assert not torch.equal(saved["test_logits"][1:], saved["test_raw_logits"][1:])
    # the readout's cost: C multiply-adds per exit after the first, added to the cumulative MACs
    assert saved["readout_macs"].tolist() == [0, 4, 8] == [r["readout_macs"] for r in record.exits]
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert "readout" in state
    # anytime accuracy of the record = accuracy of the readout outputs
    labels = saved["test_labels"]
    for k, row in enumerate(record.exits):
        assert row["top1"] == pytest.approx(100.0 * float((saved["test_logits"][k].argmax(1) == labels).float().mean()))
    # exitbench evaluate on the checkpoint = the final evaluation inside training
    code, out, err = run_cli("evaluate", run_dir, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [r["top1"] for r in report["anytime"]] == [r["top1"] for r in record.exits]
    assert [r["macs"] for r in report["anytime"]] == [r["macs"] for r in record.exits]
    assert report["budgets"] == record.budgets
    # exitbench budget on logits.pt uses the readout outputs: the same budgets; raw exits give others
    code, out, err = run_cli("budget", run_dir / "logits.pt", "--json")
    assert code == 0, err
    assert json.loads(out)["budgets"] == record.budgets
    raw_report = protocol.evaluate_logits({**saved, "val_logits": saved["val_raw_logits"],
                                           "test_logits": saved["test_raw_logits"]})
    assert [b["thresholds"] for b in raw_report["budgets"]] != [b["thresholds"] for b in record.budgets]
    # the threshold sweep reads the same outputs
    sweep = protocol.threshold_sweep(saved["test_logits"], labels, saved["macs"])
    by_hand = protocol.threshold_sweep(torch.stack(readout_outputs(readout, list(saved["test_raw_logits"]))),
                                       labels, saved["macs"])
    assert sweep == by_hand
    # text output shows the readout's share of the MACs
    code, out, err = run_cli("evaluate", run_dir)
    assert code == 0 and "readout MACs" in out


def test_ztw_checkpoint_evaluates_as_training_did(tmp_path, run_cli):
    record = train.run(tiny_cfg(tmp_path, {"name": "ztw"}))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert any(key.startswith("ensemble_weights") for key in state["readout"])
    assert "ensemble_optimizer" in state["strategy"]
    code, out, err = run_cli("evaluate", tmp_path / "run", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [r["top1"] for r in report["anytime"]] == [r["top1"] for r in record.exits]
    assert report["budgets"] == record.budgets


def test_evaluate_refuses_a_readout_that_does_not_fit(tmp_path, run_cli):
    cfg = tiny_cfg(tmp_path, {"name": "uniform"}, epochs=1)
    train.run(cfg)
    code, out, err = run_cli("evaluate", tmp_path / "run", "method={name: ztw}")
    assert code == 2 and err.count("\n") == 1 and "readout does not fit method 'ztw'" in err
    # torch's first line ('Error(s) in loading state_dict for ZTWReadout:') names nothing: the keys and the fix
    assert "Missing key(s) in state_dict" in err and "trained with method {'name': 'uniform'" in err, err


def test_macs_include_the_readout(tmp_path):
    from bench.backbones import build
    from bench.flops import per_exit_cost

    model = build(validate_trial(TINY).backbone, 4, 3, 8)
    backbone = per_exit_cost(model, 8, 3).macs
    readout = build_readout({"name": "ztw"}, 3, 4)
    total = [b + r for b, r in zip(backbone, readout_macs(readout))]
    assert readout_macs(readout) == [4, 4 + 16 + 20 + 8, 2 * (16 + 20) + 4 + 8 + 12]
    assert total[-1] > backbone[-1]


@pytest.mark.slow
@pytest.mark.parametrize("method,crash_after", [
    ({"name": "boosted", "loss_equal": True}, 1),
    ({"name": "ztw", "ensemble_fraction": 0.5}, 3),  # epochs 3-4 fit the ensembles: resume inside stage 2
])
def test_resume_reproduces_uninterrupted_run(tmp_path, method, crash_after):
    full = train.run(tiny_cfg(tmp_path / "a", method, epochs=4))

    class Crash(Exception):
        pass

    def crash(row, run_dir):
        if row["epoch"] == crash_after:
            raise Crash

    cfg = tiny_cfg(tmp_path / "b", method, epochs=4)
    with pytest.raises(Crash):
        train.run(cfg, on_epoch=crash)
    resumed = train.run(cfg)
    strip = ("time_s", "images_per_s")
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed.epochs] == \
           [{k: v for k, v in e.items() if k not in strip} for e in full.epochs]
    assert resumed.exits == full.exits and resumed.budgets == full.budgets
    a = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)
    for key, value in a["readout"].items():
        assert torch.equal(value, b["readout"][key]), key


@pytest.mark.slow
def test_sweep_over_every_strategy_on_digits(ray_session, run_cli, tmp_path):
    from bench.registry import METHODS, load_all

    load_all()
    methods = [{"name": name} for name in METHODS.names()]
    sweep = {"name": "zoo", "base": {"data": {"name": "digits"}, "backbone": {"name": "tiny", "widths": [4, 8]},
                                     "epochs": 2, "batch_size": 64, "device": "cpu"},
             "grid": {"method": methods}, "seeds": [0], "resources": {"cpu": 1},
             "storage_path": str(tmp_path / "runs")}
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(sweep))
    code, out, err = run_cli("sweep", path, "--quiet")
    assert code == 0, out + err
    runs = results.load(tmp_path / "runs" / "zoo").runs
    assert set(runs["status"]) == {"finished"}
    assert {"boosted", "ztw", "uniform"} <= set(runs["config.method.name"])
    assert sorted(runs["config.method.name"]) == sorted(m["name"] for m in methods)


def test_bad_strategy_settings_are_one_line_exit_2_and_write_nothing(tmp_path, run_cli):
    out_dir = tmp_path / "run"
    code, _, err = run_cli("train", f"out_dir={out_dir}", "backbone={name: tiny, widths: [4, 8]}",
                           "method.name=ztw", "epochs=1")
    assert code == 2 and err.count("\n") == 1 and "method ztw" in err and "epochs >= 2" in err
    assert not out_dir.exists()
    code, _, err = run_cli("train", f"out_dir={out_dir}", "method={name: boosted, gamma: -1}")
    assert code == 2 and err.count("\n") == 1 and "method.gamma" in err and not out_dir.exists()
