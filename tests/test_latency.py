"""Real early-exit inference (bench.evaluate.latency): same decisions as the simulated protocol, samples really
leave the batch, lower latency at a low budget than at the last exit, and `exitbench latency` end to end."""

import json
import math

import pytest
import torch

from bench import results
from bench.config import validate_trial
from bench.evaluate import latency, protocol
from bench.readout import build_readout, readout_outputs
from bench.registry import BACKBONES, load_all
from bench.trial import train

load_all()


def model_and_data(widths, size=32, n_calib=60, n_test=40, classes=5):
    torch.manual_seed(0)
    model = BACKBONES.build("tiny", {"widths": widths}, num_classes=classes, in_channels=3, image_size=size).eval()
    gen = torch.Generator().manual_seed(1)
    calib, test = torch.randn(n_calib, 3, size, size, generator=gen), torch.randn(n_test, 3, size, size, generator=gen)
    labels = torch.randint(0, classes, (n_test,), generator=gen)
    with torch.no_grad():
        calib_logits, test_logits = torch.stack(model(calib)), torch.stack(model(test))
    macs = torch.arange(1, len(widths) + 1, dtype=torch.float64) * 1e6
    budgets = protocol.budgeted(calib_logits, torch.zeros(n_calib, dtype=torch.long), test_logits, labels, macs)
    saved = {"test_logits": test_logits, "test_labels": labels, "macs": macs}
    return model, test, labels, saved, budgets


def test_early_exit_drops_exited_samples_and_matches_the_rule():
    model, x, labels, saved, budgets = model_and_data([4, 8, 8], size=8)
    conf = torch.stack([torch.softmax(z, 1).amax(1) for z in saved["test_logits"]])  # written out here
    for b in budgets[::7]:
        t = [math.inf if v is None else v for v in b["thresholds"][:-1]] + [-math.inf]
        pred, exit_of = latency.early_exit(model, x, t)
        for i in range(len(x)):
            expected = next(k for k in range(3) if k == 2 or conf[k, i] >= t[k])
            assert exit_of[i] == expected and pred[i] == saved["test_logits"][expected, i].argmax()
    seen = []  # the batch really shrinks: record the batch size each stage runs on
    stage = model.stage
    model.stage = lambda k, s: (seen.append(s.shape[0]), stage(k, s))[1]
    latency.early_exit(model, x, [0.0, math.inf, -math.inf])  # everyone leaves at exit 1
    assert seen == [len(x)]
    seen.clear()
    median = float(conf[0].median())
    latency.early_exit(model, x, [median, math.inf, -math.inf])
    assert seen == [len(x), int((conf[0] < median).sum()), int((conf[0] < median).sum())]


def test_real_exit_accuracy_equals_simulated():
    model, x, labels, saved, budgets = model_and_data([4, 8, 8], size=8)
    rows = latency.run_latency(model, x, labels, saved, budgets[::6], torch.device("cpu"), 16, "max_softmax")
    for r in rows:
        assert r["real_acc_b1"] == r["sim_acc"] == r["real_acc_batched"] and r["exits_differing"] == 0, r
    for r, b in zip(rows[3:], budgets[::6]):
        assert r["expected_macs"] == pytest.approx(b["expected_macs"]) and r["sim_acc"] == b["test_acc"]


@pytest.mark.parametrize("method", ["boosted", "ztw"])
def test_real_exit_through_a_readout_equals_simulated(method):
    """Exits that report a function of exits 1..k (the readout's carry shrinks with the batch)."""
    model, x, labels, _, _ = model_and_data([4, 8, 8], size=8)
    readout = build_readout({"name": method}, 3, 5).eval()
    with torch.no_grad():
        for p in readout.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
        gen = torch.Generator().manual_seed(6)
        calib = torch.randn(60, 3, 8, 8, generator=gen)
        calib_out = torch.stack(readout_outputs(readout, model(calib)))
        test_out = torch.stack(readout_outputs(readout, model(x)))
    macs = torch.tensor([1e6, 2e6, 3e6], dtype=torch.float64)
    budgets = protocol.budgeted(calib_out, torch.zeros(60, dtype=torch.long), test_out, labels, macs)
    saved = {"test_logits": test_out, "test_labels": labels, "macs": macs}
    rows = latency.run_latency(model, x, labels, saved, budgets[::4], torch.device("cpu"), 16, "max_softmax",
                               readout)
    assert {r["exits_differing"] for r in rows} == {0}
    assert all(r["real_acc_b1"] == r["sim_acc"] == r["real_acc_batched"] for r in rows)
    assert len({r["sim_acc"] for r in rows if r["policy"] == "budget"}) > 1  # the budgets differ


@pytest.mark.slow
def test_batch1_latency_at_the_lowest_budget_is_below_the_last_exit():
    # Exit 1 costs ~1 % of the network; at p = 1 about 95 % of the images leave there.
    model, x, labels, saved, budgets = model_and_data([8, 96, 160, 192], size=32, n_test=30)
    with torch.no_grad():
        rows = latency.run_latency(model, x, labels, saved, [budgets[0]], torch.device("cpu"), 10, "max_softmax")
    last = next(r for r in rows if r["exit"] == 4)
    lowest = next(r for r in rows if r["p"] == 1)
    assert lowest["ms_p50"] < 0.8 * last["ms_p50"], (lowest["ms_p50"], last["ms_p50"])


TRIAL = {"data": {"name": "synthetic", "num_classes": 4, "image_size": 8, "train_size": 64, "test_size": 24,
                  "val_size": 0.25},
         "backbone": {"name": "tiny", "widths": [4, 8]}, "epochs": 1, "batch_size": 16, "progress": False,
         "device": "cpu"}


@pytest.mark.slow
def test_cli_latency_table_result_store_and_report(run_cli, tmp_path):
    run_dir = tmp_path / "sweep" / "run"
    train.run(validate_trial(TRIAL), run_dir)
    code, out, err = run_cli("latency", run_dir, "--threads", "1", "--budgets", "1", "20", "39", "--batch-size", "8")
    assert code == 0, err
    assert "ms mean" in out and "check: real-exit accuracy equals the simulated one at all 3 budgets" in out
    record = json.loads((run_dir / "result.json").read_text())
    assert [r["policy"] for r in record["latency"]] == ["exit", "exit", "budget", "budget", "budget"]
    assert all(r["device"].startswith("cpu") for r in record["latency"])
    tables = results.load(run_dir)  # a standalone run gets a store of one
    assert len(tables.latency) == 5 and {"device", "ms_p50", "batched_images_per_s"} <= set(tables.latency)
    code, out, err = run_cli("report", run_dir, "--out", tmp_path / "report")
    assert code == 0, err
    assert (tmp_path / "report" / "latency.png").is_file()


def test_cli_latency_bad_input(run_cli, tmp_path):
    code, _, err = run_cli("latency", tmp_path / "nope")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("latency", tmp_path / "empty")
    assert code == 2 and "no result.json" in err
    run_dir = tmp_path / "run"
    train.run(validate_trial(TRIAL), run_dir)
    for args, words in ((["--budgets", "40"], "not among the run's budgets"), (["--batch-size", "0"], ">= 1"),
                        (["--limit", "0"], ">= 1"), (["--device", "tpu"], "give cpu, cuda")):
        code, _, err = run_cli("latency", run_dir, *args)
        assert code == 2 and words in err and err.count("\n") == 1, err
    kept = tmp_path / "checkpoint_000001"  # a sweep trial's run folder: Ray Tune keeps the checkpoints beside it
    kept.mkdir()
    (run_dir / "checkpoint.pt").rename(kept / "checkpoint.pt")
    code, out, err = run_cli("latency", run_dir, "--budgets", "1", "--limit", "4", "--threads", "1")
    assert code == 0 and "check: real-exit accuracy equals" in out, err
    (kept / "checkpoint.pt").unlink()
    code, _, err = run_cli("latency", run_dir)
    assert code == 2 and "no checkpoint.pt" in err


@pytest.mark.parametrize("measured", [[1, 20, 39], list(range(1, 40))])
def test_latency_figure_caption_counts_the_measured_budgets(tmp_path, monkeypatch, measured):
    """`exitbench latency --budgets 1 20 39` measures 3 budgets; the caption said 'the 39 budgets' anyway."""
    import pandas as pd

    from bench.report import figures

    captions = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, name, caption: captions.append(caption) or [])
    rows = [{"trial_id": "t", "device": "cpu", "policy": "exit", "p": None, "ms_p50": 0.1 * k, "real_acc_b1": 50.0}
            for k in (1, 2)]
    rows += [{"trial_id": "t", "device": "cpu", "policy": "budget", "p": p, "ms_p50": 0.1 + p / 100,
              "real_acc_b1": 60.0} for p in measured]
    runs = pd.DataFrame([{"trial_id": "t", "label": "uniform", "seed": 0}])
    figures.latency_figure(tmp_path, runs, pd.DataFrame(rows))
    expected = "the 39 budgets'" if len(measured) == 39 else "3 of the 39 budgets' (--budgets)"
    assert captions == [f"lines: {expected} thresholds; crosses: each exit alone"]
