"""Training regimes (joint / disjoint / mixed) through the real trial loop on a tiny synthetic task."""

import json

import pytest
import torch

from bench.config import RegimeConfig, validate_trial
from bench.errors import ConfigError
from bench.trial import train

TINY = {
    "data": {"name": "synthetic", "num_classes": 4, "image_size": 8, "train_size": 96, "test_size": 40,
             "val_size": 0.25},
    "backbone": {"name": "tiny", "widths": [4, 8, 8]},
    "epochs": 4,
    "batch_size": 16,
    "progress": False,
    "deterministic": True,
    "device": "cpu",
}


def cfg(tmp_path, **changes):
    raw = json.loads(json.dumps(TINY))
    raw["out_dir"] = str(tmp_path / "run")
    raw.update(changes)
    return validate_trial(raw)


def run_keeping_checkpoints(c):
    """Train; return the record and the model state after every epoch (from the checkpoint on disk)."""
    states = {}

    def keep(row, run_dir):
        states[row["epoch"]] = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]

    return train.run(c, on_epoch=keep), states


def is_backbone(key: str, num_exits: int = 3) -> bool:
    """Everything but the earlier exits' heads (heads.0, heads.1): stages and the last head."""
    return not any(key.startswith(f"heads.{k}.") for k in range(num_exits - 1))


def changed(a, b, keys):
    return sorted(k for k in keys if not torch.equal(a[k], b[k]))


def test_disjoint_phase_2_freezes_backbone_and_batchnorm(tmp_path):
    record, states = run_keeping_checkpoints(cfg(tmp_path, regime={"name": "disjoint", "phase1": 0.5},
                                                 method={"name": "distill", "teacher": "all_later"}))
    assert [e["phase"] for e in record.epochs] == [1, 1, 2, 2]
    end1, end2 = states[2], states[4]
    backbone = [k for k in end1 if is_backbone(k)]
    buffers = [k for k in backbone if "running_" in k or "num_batches_tracked" in k]
    assert len(buffers) >= 12  # 3 stages x 2 BatchNorms x (mean, var, count)
    assert changed(end1, end2, backbone) == []  # no parameter and no BatchNorm buffer moved in phase 2
    heads = sorted(k for k in end1 if not is_backbone(k))
    assert changed(end1, end2, heads) == heads  # the earlier heads trained
    # phase 1 trains the backbone and the last head only (the earlier heads get no gradient at all)
    assert changed(states[1], end1, heads) == []
    assert changed(states[1], end1, [k for k in backbone if k.startswith("stages.")])
    # the LR schedule (multistep at 50 % and 75 %) restarts over phase 2's two epochs
    assert [e["lr"] for e in record.epochs] == pytest.approx([0.1, 0.01, 0.1, 0.01])


def test_mixed_phase_2_trains_everything(tmp_path):
    record, states = run_keeping_checkpoints(cfg(tmp_path, regime="mixed", method="sdn"))
    assert [e["phase"] for e in record.epochs] == [1, 1, 2, 2]
    end1, end2 = states[2], states[4]
    assert changed(end1, end2, list(end1)) == sorted(end1)  # every parameter and buffer, backbone included


def test_joint_is_one_phase_and_unchanged(tmp_path):
    record = train.run(cfg(tmp_path, epochs=2))
    assert [e["phase"] for e in record.epochs] == [1, 1]
    assert [e["lr"] for e in record.epochs] == pytest.approx([0.1, 0.01])


@pytest.mark.parametrize("crash_after", [1, 3])  # inside phase 1, inside phase 2
def test_resume_keeps_temperature_and_phase(tmp_path, crash_after):
    full_cfg = cfg(tmp_path / "a", regime="mixed", method={"name": "kd-anneal", "maxprob": 0.26})
    full, _ = run_keeping_checkpoints(full_cfg)
    full_state = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)

    class Crash(Exception):
        pass

    def crash(row, run_dir):
        if row["epoch"] == crash_after:
            raise Crash

    c = cfg(tmp_path / "b", regime="mixed", method={"name": "kd-anneal", "maxprob": 0.26})
    with pytest.raises(Crash):
        train.run(c, on_epoch=crash)
    resumed = train.run(c)
    state = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)
    assert full_state["strategy"]["phase2"]["temperature"] > 1.0  # the schedule ran (maxprob just above chance)
    assert state["strategy"]["phase2"]["temperature"] == full_state["strategy"]["phase2"]["temperature"]
    strip = ("time_s", "images_per_s")
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed.epochs] == \
           [{k: v for k, v in e.items() if k not in strip} for e in full.epochs]
    assert resumed.exits == full.exits


def test_phase_lengths():
    assert RegimeConfig(name="mixed", phase1=0.5).phase1_epochs(4) == 2
    assert RegimeConfig(name="mixed", phase1=0.1).phase1_epochs(4) == 1  # at least one epoch per phase
    assert RegimeConfig(name="mixed", phase1=0.9).phase1_epochs(4) == 3
    assert RegimeConfig(name="joint").phase1_epochs(4) == 0
    with pytest.raises(ConfigError, match=r"regime.name: disjoint has two phases and needs epochs >= 2"):
        validate_trial({"regime": "disjoint", "epochs": 1})


@pytest.mark.parametrize("method, regime", [
    ("last", "disjoint"),  # phase 2 has nothing to train: it completes without an update
    ("byot", "disjoint"),
    ("{name: distill, teacher: all_later}", "mixed"),
    ("linear", "joint"),
])
def test_cli_train_method_by_regime(run_cli, tmp_path, method, regime):
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(dict(TINY, epochs=2, deterministic=False)))
    code, out, err = run_cli("train", path, f"method={method}", f"regime={regime}", f"out_dir={tmp_path / 'run'}")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ([1, 1] if regime == "joint" else [1, 2])


@pytest.mark.parametrize("overrides, message", [
    (["method.exit_weights=cubic"], "method.exit_weights: unknown schedule 'cubic'"),
    (["method.exit_weights=[1, 2]"], "method.exit_weights: 3 exits need 3 weights, got 2"),
    (["regime.phase1=1.5"], "regime.phase1: "),
    (["regime.phase1=0"], "regime.phase1: "),
    (["regime=sequential"], "regime.name: "),
    (["regime=disjoint", "epochs=1"], "regime.name: disjoint has two phases and needs epochs >= 2"),
    (["method=sdn", "method.c=[0.5]"], "method.c: 2 internal exits need 2 values, got 1"),
    (["method=kd-anneal", "method.maxprob=1.5"], "method.maxprob: "),
    (["method=byot", "backbone={name: sdn, arch: squeezenet1_0, cuts: [features.3]}", "data.image_size=32"],
     "method.beta: the feature hint needs per-exit embeddings"),
])
def test_bad_values_are_one_line_exit_2(run_cli, tmp_path, overrides, message):
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(TINY))
    code, out, err = run_cli("train", path, f"out_dir={tmp_path / 'run'}", *overrides)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("exitbench: error: "), err
    assert message in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.slow
def test_sweep_over_methods_and_regimes(ray_session, run_cli, tmp_path):
    import yaml

    from bench import results

    base = dict(TINY, epochs=2, deterministic=False)
    del base["progress"]
    sweep = {"name": "zoo", "base": base, "seeds": [0], "resources": {"cpu": 1}, "storage_path": str(tmp_path),
             "grid": {"method": ["last", "byot", {"name": "distill", "teacher": "all_later"}],
                      "regime": ["joint", "disjoint"]}}
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(sweep))
    code, out, err = run_cli("sweep", path, "--quiet")
    assert code == 0, out + err
    assert "6 trials: 6 finished, 0 failed" in out
    tables = results.load(tmp_path / "zoo")
    assert sorted(zip(tables.runs["config.method.name"], tables.runs["config.regime.name"])) == sorted(
        (m, r) for m in ("byot", "distill", "last") for r in ("joint", "disjoint"))
    phases = tables.epochs.merge(tables.runs[["trial_id", "config.regime.name"]], on="trial_id")
    assert len(phases) == 12  # joint: phase 1 throughout; disjoint (2 epochs): epoch 1 is phase 1, epoch 2 phase 2
    assert (phases["phase"] == phases["epoch"].where(phases["config.regime.name"] == "disjoint", 1)).all()


def test_a_section_given_by_name_keeps_it_under_dotted_overrides(run_cli, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("regime: disjoint\nbackbone: msdnet-cifar-budget\n")
    code, out, err = run_cli("config", "show", path, "regime.phase1=0.3", "backbone.nBlocks=3")
    assert code == 0, err
    assert "regime:\n  name: disjoint\n  phase1: 0.3\n" in out
    assert "backbone:\n  name: msdnet-cifar-budget\n" in out and "  nBlocks: 3\n" in out
