import pytest
import yaml

from bench import config
from bench.config import SweepConfig, TrialConfig, apply_overrides, load_trial, validate_sweep, validate_trial
from bench.errors import ConfigError, UsageError


def test_defaults_are_fully_expanded():
    cfg = TrialConfig()
    assert cfg.data["name"] == "digits" and "val_size" in cfg.data
    assert cfg.backbone == {"name": "tiny", "widths": [16, 32, 48, 64], "head_hidden": 0}
    assert cfg.method["name"] == "uniform" and "label_smoothing" in cfg.method
    assert cfg.optim.lr == 0.1


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("epochs: 3\noptim: {lr: 0.05}\nbackbone: {name: tiny, widths: [8, 8]}\n")
    cfg = load_trial(path)
    assert cfg.epochs == 3 and cfg.optim.lr == 0.05 and cfg.backbone["widths"] == [8, 8]
    again = validate_trial(yaml.safe_load(config.to_yaml(cfg)))
    assert again == cfg


def test_overrides_are_parsed_as_yaml_values():
    raw = apply_overrides({}, ["optim.lr=0.5", "deterministic=true", "backbone.widths=[4, 8]", "name=abc"])
    assert raw == {"optim": {"lr": 0.5}, "deterministic": True, "backbone": {"widths": [4, 8]}, "name": "abc"}
    cfg = validate_trial(apply_overrides({}, ["backbone.widths=[4, 8]"]))  # options of the default backbone
    assert cfg.backbone["widths"] == [4, 8]


def test_grid_overrides_keep_dotted_axis_names():
    raw = apply_overrides({"grid": {"method": ["uniform"]}},
                          ["grid.optim.lr=[0.1, 0.2]", "search.space.epochs={randint: [1, 3]}"])
    assert raw["grid"] == {"method": ["uniform"], "optim.lr": [0.1, 0.2]}
    assert raw["search"] == {"space": {"epochs": {"randint": [1, 3]}}}
    assert len(validate_sweep(raw).trials()) == 2
    with pytest.raises(ConfigError, match="grid.optim.lrr: no such trial field"):
        validate_sweep(apply_overrides({}, ["grid.optim.lrr=[0.1]"]))


def test_switching_component_by_name_drops_old_params():
    raw = apply_overrides({"data": {"name": "synthetic", "noise": 0.5}}, ["data=digits"])
    assert raw["data"] == {"name": "digits"}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"optim": {"lrr": 0.1}}, "unknown field 'optim.lrr'"),
        ({"optim": {"lr": -0.1}}, r"optim.lr: Input should be greater than 0, got -0.1"),
        ({"epochs": "many"}, r"epochs: Input should be a valid integer.*got 'many'"),
        ({"epochs": 0}, r"epochs: .*greater than or equal to 1"),
        ({"misspelt": 1}, "unknown field 'misspelt'"),
        ({"backbone": {"name": "nope"}}, r"backbone.name: unknown backbone 'nope'; valid: .*tiny"),
        ({"backbone": {"name": "tiny", "depth": 3}}, "unknown field 'backbone.depth'"),
        ({"data": {"name": "synthetic", "num_classes": 1}}, r"data.num_classes: .*greater than or equal to 2"),
        ({"method": {"name": "uniform", "label_smoothing": 2}}, r"method.label_smoothing"),
        ({"device": "tpu"}, r"device: .*auto, cpu, cuda"),
        ({"schedule": {"milestones": [0.8, 0.2]}}, r"schedule.milestones"),
    ],
)
def test_bad_trial_configs_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        validate_trial(raw)


def test_sweep_expands_grid_times_seeds():
    sweep = validate_sweep({"base": {"epochs": 1}, "grid": {"optim.lr": [0.1, 0.2], "method": ["uniform"]},
                            "seeds": [0, 1, 2]})
    trials = sweep.trials()
    assert len(trials) == 6
    assert sorted({(t.optim.lr, t.seed) for t in trials}) == [(lr, s) for lr in (0.1, 0.2) for s in (0, 1, 2)]


def test_sweep_axis_may_give_whole_components():
    sweep = validate_sweep({"grid": {"data": [{"name": "synthetic", "noise": 0.3}, "digits"]}})
    names = [t.data["name"] for t in sweep.trials()]
    assert names == ["synthetic", "digits"]
    assert sweep.trials()[0].data["noise"] == 0.3


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"grid": {"optim.lrr": [0.1]}}, r"grid.optim.lrr: no such trial field"),
        ({"grid": {"nothing": [1]}}, r"grid.nothing: no such trial field"),
        ({"grid": {"optim.lr": []}}, r"grid.optim.lr: empty axis"),
        ({"grid": {"optim.lr": [0.1, -1]}}, r"optim.lr: .*greater than 0.*grid point"),
        ({"seeds": []}, r"seeds: .*at least one seed"),
        ({"resources": {"cpu": 0}}, r"resources.cpu"),
        ({"grid": {"backbone.depth": [1]}}, r"unknown field 'backbone.depth'"),
    ],
)
def test_bad_sweeps_are_rejected_before_work(raw, message):
    with pytest.raises(ConfigError, match=message):
        validate_sweep(raw)


def test_bad_override_syntax():
    with pytest.raises(UsageError, match="dotted.key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(UsageError, match="dotted.key=value"):
        apply_overrides({}, ["optim..lr=1"])


def test_missing_or_bad_yaml(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_trial(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_trial(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(UsageError, match="mapping at the top level"):
        load_trial(listy)


def test_params_accessor_returns_models():
    cfg = TrialConfig(method={"name": "uniform", "label_smoothing": 0.1})
    assert cfg.params("method").label_smoothing == 0.1
    assert SweepConfig().base == TrialConfig()
