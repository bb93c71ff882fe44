"""The first hour with exitbench (issue 14, items 7-17): sweep overrides, bundled sweeps by name, defaults,
did-you-mean, sections replaced on a new name, search-space errors, result tables unpacked, sdn cut points,
plugins, trackers, the live table's columns, no traceback on a closed pipe."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from bench import config, registry, results
from bench.config import apply_overrides, load_sweep, validate_sweep, validate_trial
from bench.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
# The README and the documentation pages (docs/*.md) as one text: the sections read here live in docs/.
README = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exitbench: error: "), err
    return lines[0]


# ---------------------------------------------------------------- 16: sweep overrides of the base's fields


def test_sweep_overrides_set_base_fields_with_or_without_prefix():
    sweep = load_sweep(config.bundled_sweeps()["default"], ["epochs=1", "base.batch_size=32", "optim.lr=0.2",
                                                            "seeds=[0]", "name=quick", "base.name=t"])
    assert (sweep.base.epochs, sweep.base.batch_size, sweep.base.optim.lr) == (1, 32, 0.2)
    assert sweep.seeds == [0] and sweep.name == "quick" and sweep.base.name == "t"
    assert {t.epochs for t in sweep.trials()} == {1}


def test_sweep_override_of_a_grid_axis_names_the_axis():
    with pytest.raises(UsageError, match=r"'method' is a grid axis.*grid\.method=\[\.\.\.\]"):
        load_sweep(config.bundled_sweeps()["default"], ["method.name=l2w"])
    sweep = load_sweep(config.bundled_sweeps()["default"], ["grid.method=[uniform]"])
    assert {t.method["name"] for t in sweep.trials()} == {"uniform"}


def test_a_trial_file_given_to_sweep_says_so(run_cli, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("epochs: 2\nmethod: {name: l2w}\n")
    code, out, err = run_cli("sweep", path, "--quiet")
    assert code == 2 and "is a trial config (epochs: ...), not a sweep" in one_line(err)


def _help_examples(capsys, command: str) -> list[list[str]]:
    from bench.cli.main import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    lines = [line.strip() for line in out.split("examples:")[1].splitlines()]
    return [re.split(r"\s{2,}", line)[0].split()[1:] for line in lines if line.startswith(f"exitbench {command}")]


def test_sweep_help_examples_run(run_cli, capsys, monkeypatch, tmp_path):
    """Every example in `exitbench sweep --help` gets as far as starting Ray (which is replaced here)."""
    from bench.sweep import driver

    monkeypatch.chdir(tmp_path)
    started = []

    def fake_run(sweep, **kw):
        started.append(sweep)
        return driver.Outcome(str(tmp_path / sweep.name), sweep)

    def fake_resume(name, storage, **kw):
        started.append(name)
        return driver.Outcome(str(tmp_path / name), load_sweep(config.bundled_sweeps()["default"]))

    monkeypatch.setattr(driver, "run_sweep", fake_run)
    monkeypatch.setattr(driver, "resume_sweep", fake_resume)
    examples = _help_examples(capsys, "sweep")
    assert len(examples) >= 5 and ["sweep", "--resume", "quick"] in examples
    for args in examples:
        code, _, err = run_cli(*args)
        assert code == 0, (args, err)
    quick = next(s for s in started if not isinstance(s, str) and s.name == "quick")
    assert quick.base.epochs == 2 and quick.seeds == [0]


# ---------------------------------------------------------------- 17: defaults, a user's dataset, a closed pipe


def test_config_show_without_a_file_prints_the_defaults(run_cli):
    code, out, _ = run_cli("config", "show")
    assert code == 0 and yaml.safe_load(out) == validate_trial({}).model_dump(mode="json")
    code, out, _ = run_cli("config", "show", "method=l2w", "epochs=2")
    assert code == 0 and yaml.safe_load(out)["method"]["name"] == "l2w" and yaml.safe_load(out)["epochs"] == 2


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_dataset_snippet_passes_data_check(run_cli, fresh_registries, tmp_path):
    """The README's dataset, in a file of its own, loaded with --include: `data check` prints its splits."""
    dataset_src = next(b for b in _python_blocks() if "DATASETS.register" in b)
    (tmp_path / "readme_dataset.py").write_text(dataset_src)
    code, out, err = run_cli("--include", tmp_path / "readme_dataset.py", "data", "check", "mine", "val_size=0.2")
    assert code == 0, err
    assert re.search(r"^train\s+800$", out, re.M) and re.search(r"^val\s+200 \(held out", out, re.M)
    assert re.search(r"^test\s+200$", out, re.M)


@pytest.mark.slow
def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    done = subprocess.Popen([sys.executable, "-m", "bench", "list", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    done.stdout.close()  # the reader is gone before anything is written (`exitbench ... | head` after head exits)
    err = done.stderr.read().decode()
    assert done.wait() == 141 and err == ""


@pytest.mark.slow
def test_budget_json_into_a_closed_pipe(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    path = tmp_path / "logits.pt"
    torch.save({"val_logits": torch.randn(3, 200, 10, generator=g), "val_labels": torch.randint(0, 10, (200,)),
                "test_logits": torch.randn(3, 200, 10, generator=g), "test_labels": torch.randint(0, 10, (200,)),
                "macs": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}, path)
    done = subprocess.Popen([sys.executable, "-m", "bench", "budget", str(path), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    done.stdout.close()
    err = done.stderr.read().decode()
    assert done.wait() == 141 and "Traceback" not in err and err == ""


# ---------------------------------------------------------------- 11: did-you-mean, a new name replaces a section


@pytest.mark.parametrize("raw, message", [
    ({"method": {"name": "l2w", "normalisation": "col"}}, "unknown field 'method.normalisation' (did you mean "
                                                           "'normalize'?)"),
    ({"optim": {"lrr": 0.1}}, "unknown field 'optim.lrr' (did you mean 'lr'?)"),
    ({"epoch": 3}, "unknown field 'epoch' (did you mean 'epochs'?)"),
    ({"method": {"name": "l2ww"}}, "unknown method 'l2ww' (did you mean 'l2w'?)"),
    ({"misspelt": 1}, "unknown field 'misspelt'; "),
])
def test_unknown_fields_and_names_get_a_did_you_mean(raw, message):
    with pytest.raises(UsageError) as err:
        validate_trial(raw)
    assert message.removesuffix("; ") in str(err.value)
    if message.endswith("; "):
        assert "did you mean" not in str(err.value)


def test_unknown_sweep_field_did_you_mean():
    with pytest.raises(UsageError, match=r"unknown field 'sedes' \(did you mean 'seeds'\?\)"):
        validate_sweep({"sedes": [0]})
    with pytest.raises(UsageError, match=r"grid.optim.lrr: no such trial field \(did you mean 'lr'\?\)"):
        validate_sweep({"grid": {"optim.lrr": [0.1]}})


def test_a_new_component_name_replaces_the_section():
    """A checkpoint's digits config evaluated on synthetic data: digits' own fields do not follow."""
    saved = validate_trial({"data": {"name": "digits", "image_size": 8, "test_fraction": 0.3}}).model_dump(mode="json")
    cfg = validate_trial(apply_overrides(saved, ["data.num_classes=4", "data.name=synthetic"]))
    assert cfg.data["name"] == "synthetic" and cfg.data["num_classes"] == 4 and "test_fraction" not in cfg.data
    assert cfg.data["image_size"] == 16  # synthetic's default, not the checkpoint's digits value
    same = validate_trial(apply_overrides(saved, ["data.name=digits"]))  # the same name keeps the section
    assert same.data["test_fraction"] == 0.3
    sweep = load_sweep(config.bundled_sweeps()["default"], ["backbone.name=sdn", "backbone.arch=cifar_resnet20",
                                                            "backbone.cuts=[layer1, layer2]"])
    assert sweep.base.backbone["arch"] == "cifar_resnet20" and "widths" not in sweep.base.backbone


# ---------------------------------------------------------------- 7: bundled sweeps by name


def test_bundled_sweeps_are_listed_named_and_documented(run_cli):
    bundled = config.bundled_sweeps()
    assert {"default", "l2w-ablation", "cifar100-msdnet"} <= set(bundled)
    code, out, _ = run_cli("list")
    listed = out.split("sweeps (bundled")[1]
    assert code == 0 and all(re.search(rf"^  {re.escape(n)}\s+\S", listed, re.M) for n in bundled)
    code, out, _ = run_cli("config", "show", "l2w-ablation", "epochs=30", "grid.method.epsilon=[0.8]")
    shown = yaml.safe_load(out)
    assert code == 0 and shown["name"] == "l2w-ablation" and shown["base"]["epochs"] == 30
    section = (ROOT / "docs" / "configuration.md").read_text().split("\n## Bundled sweeps\n")[1].split("\n## ")[0]
    assert all(f"`{n}`" in section for n in bundled), "docs/configuration.md lists every bundled sweep"
    for path in bundled.values():  # comments that name a file name one that exists
        for ref in re.findall(r"configs/[\w.-]+\.yaml", path.read_text()):
            assert (ROOT / "bench" / ref).is_file(), ref


def test_unknown_sweep_name_suggests_a_bundled_one(run_cli):
    code, out, err = run_cli("sweep", "defualt", "--quiet")
    assert code == 2 and out == ""
    assert "(did you mean 'default'?)" in one_line(err) and "l2w-ablation" in err


# ---------------------------------------------------------------- 8: search.space, documented and explained


def test_readme_asha_example_validates_and_bad_forms_name_the_accepted_ones():
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README, flags=re.S) if "scheduler: asha" in b)
    sweep = validate_sweep(yaml.safe_load(block))
    assert sweep.search.scheduler == "asha" and sweep.search.space
    for bad in ([0.01, 0.5], {"logunifrm": [0.01, 0.5]}, {"loguniform": 0.1}):
        with pytest.raises(UsageError) as err:
            validate_sweep({"search": {"space": {"optim.lr": bad}}})
        assert "accepted forms: {uniform: [low, high]}, {loguniform: [low, high]}, {randint: [low, high]}, " \
               "{choice: [a, b, ...]}" in str(err.value)


# ---------------------------------------------------------------- 9: load() unpacks into the four tables


def test_results_load_unpacks_and_has_attributes(tmp_path):
    for table in results.TABLES:
        (tmp_path / "store" / table).mkdir(parents=True)
    tables = results.load(tmp_path)
    runs, exits, budgets, epochs = tables
    assert runs is tables.runs and exits is tables.exits and budgets is tables.budgets and epochs is tables.epochs
    assert "runs, exits, budgets, epochs = load(" in README


# ---------------------------------------------------------------- 10: sdn cut points


def test_flops_list_cuts_shows_valid_cut_points(run_cli):
    code, out, _ = run_cli("flops", "sdn", "arch=cifar_resnet20", "cuts=[layer1.2, layer2]", "--list-cuts")
    lines = out.splitlines()
    assert code == 0 and "cifar_resnet20" in lines[0]
    names = [line[4:] for line in lines[1:]]
    assert names[:4] == ["conv1", "bn1", "relu", "layer1"] and "layer3.2" in names and "layer3.3" not in names
    assert [line[4:] for line in lines[1:] if line.startswith("  *")] == ["layer1.2", "layer2"]
    code, out, _ = run_cli("flops", "sdn-resnet18", "--list-cuts", "--json")
    listing = json.loads(out)
    assert code == 0 and listing["cuts"] == ["layer1", "layer2", "layer3"] and "layer4.1" in listing["valid"]
    code, out, err = run_cli("flops", "tiny", "--list-cuts")
    assert code == 2 and "fixed exits" in one_line(err)


# ---------------------------------------------------------------- 12: listing does not import torchvision


def test_listing_does_not_import_torchvision():
    code = "import sys; from bench.registry import load_all; load_all(); print('torchvision' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


# ---------------------------------------------------------------- 15: plugins


PLUGIN = textwrap.dedent('''
    from bench.registry import METHODS
    from methods.uniform import Uniform, UniformParams

    class HalfParams(UniformParams):
        factor: float = 0.5

    @METHODS.register("{name}", HalfParams)
    class Half(Uniform):
        """A plugin method."""
''')


def test_include_a_file_or_a_folder(run_cli, fresh_registries, tmp_path):
    (tmp_path / "plugin_one.py").write_text(PLUGIN.format(name="plugged-one"))
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "plugin_two.py").write_text(PLUGIN.format(name="plugged-two"))
    (folder / "_private.py").write_text("raise RuntimeError('not imported')\n")
    code, out, err = run_cli("--include", tmp_path / "plugin_one.py", "--include", folder, "list")
    assert code == 0, err
    assert re.search(r"^  plugged-one\s+A plugin method", out, re.M) and "plugged-two" in out
    cfg = validate_trial({"method": {"name": "plugged-two", "factor": 0.25}})
    assert cfg.method["name"] == "plugged-two" and cfg.method["factor"] == 0.25
    assert registry.included() == [str(tmp_path / "plugin_one.py"), str(folder)]


@pytest.mark.parametrize("content, message", [
    (None, "no such .py file or folder"),
    ("raise ImportError('needs the foo package')\n", "failed to load: ImportError: needs the foo package"),
    (PLUGIN.format(name="uniform"), "failed to load: ValueError: method 'uniform' is registered twice"),
    ("x = 1\n", "a module named 'yaml' is loaded already"),
])
def test_bad_includes_are_one_line(run_cli, fresh_registries, tmp_path, content, message):
    path = tmp_path / ("yaml.py" if "yaml" in message else "plugin_bad.py")
    if content is not None:
        path.write_text(content)
    code, out, err = run_cli("--include", path, "list")
    assert code == 2 and out == "" and message in one_line(err)


def test_entry_point_plugins_are_loaded(fresh_registries, tmp_path, monkeypatch):
    """An installed distribution (a dist-info with entry_points.txt on sys.path) adds a method by entry point."""
    dist = tmp_path / "fakeplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[exitbench.methods]\nhalf = fakeplug_methods\n")
    (tmp_path / "fakeplug_methods.py").write_text(PLUGIN.format(name="from-entry-point"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "from-entry-point" not in fresh_registries["METHODS"]
    registry.load_all()
    assert "from-entry-point" in fresh_registries["METHODS"]
    assert validate_trial({"method": "from-entry-point"}).method["factor"] == 0.5


# ---------------------------------------------------------------- 13: trackers through Ray Tune's callbacks


def test_missing_tracker_package_is_one_line(run_cli, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, out, err = run_cli("sweep", "default", "loggers.wandb.project=mine", f"storage_path={tmp_path}", "--quiet")
    assert code == 2 and out == "" and "pip install wandb" in one_line(err)
    assert not (tmp_path / "default").exists()


def test_tracker_callbacks_are_ray_tunes_own(monkeypatch):
    import importlib.util

    import ray.air.integrations.wandb as ray_wandb
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    from bench.sweep import loggers

    monkeypatch.setattr(ray_wandb, "wandb", object())  # its constructor checks that wandb was imported
    monkeypatch.setitem(sys.modules, "mlflow", type(sys)("mlflow"))  # ... and MLflow's imports mlflow

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("wandb", "mlflow")
                        else real(name, *a))
    sweep = load_sweep(config.bundled_sweeps()["default"], ["loggers={wandb: {group: g}, mlflow: {tracking_uri: "
                                                            "file:/tmp/mlruns}}"])
    wandb_cb, mlflow_cb = loggers.logger_callbacks(sweep)
    assert isinstance(wandb_cb, WandbLoggerCallback) and (wandb_cb.project, wandb_cb.group) == ("default", "g")
    assert isinstance(mlflow_cb, MLflowLoggerCallback) and mlflow_cb.experiment_name == "default"
    bad = load_sweep(config.bundled_sweeps()["default"], ["loggers.mlflow.tracking_url=x"])
    with pytest.raises(UsageError, match=r"loggers.mlflow.tracking_url: not an option of Ray's MLflowLoggerCallback"):
        loggers.logger_callbacks(bad)


# ---------------------------------------------------------------- 14: the live table shows what the grid varies


def test_live_table_columns_are_the_grid_s_varied_keys():
    from bench.sweep import grid, loggers

    default = load_sweep(config.bundled_sweeps()["default"])
    assert list(grid.varied_columns(default).values()) == ["method.name", "method.meta_grad", "seed"]
    ablation = load_sweep(config.bundled_sweeps()["l2w-ablation"])
    assert list(grid.varied_columns(ablation).values()) == [
        "method.epsilon", "method.normalize", "method.wpn_input", "method.target_p", "method.meta_interval",
        "method.meta_objective", "seed"]
    one = load_sweep(config.bundled_sweeps()["default"], ["grid={}", "seeds=[0]", "search.num_samples=2",
                                                          "search.space={optim.lr: {loguniform: [0.01, 0.1]}}"])
    assert grid.varied_columns(one) == {"point/trial/seed": "seed", "point/trial/optim/lr": "optim.lr"}
    reporter = loggers.reporter(default)
    assert "method.label_smoothing" not in reporter._parameter_columns.values()


@pytest.mark.slow
def test_included_plugin_runs_in_sweep_trials(ray_session, run_cli, fresh_registries, tmp_path):
    """Ray trials import the driver's --include paths themselves (their processes never saw the flag)."""
    (tmp_path / "plugin_sweep.py").write_text(PLUGIN.format(name="plugged-sweep"))
    raw = {"name": "plugged", "seeds": [0], "storage_path": str(tmp_path / "runs"),
           "base": {"data": {"name": "synthetic", "num_classes": 3, "image_size": 8, "train_size": 48,
                             "test_size": 24, "val_size": 0.25}, "backbone": {"name": "tiny", "widths": [4, 8]},
                    "method": {"name": "plugged-sweep"}, "epochs": 1, "batch_size": 16, "device": "cpu"}}
    path = tmp_path / "plugged.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, out, err = run_cli("--include", tmp_path / "plugin_sweep.py", "sweep", path, "--quiet")
    assert code == 0, out + err
    runs = results.load(tmp_path / "runs" / "plugged").runs
    assert list(runs["status"]) == ["finished"] and list(runs["config.method.name"]) == ["plugged-sweep"]


def test_include_of_an_empty_folder_or_a_non_py_file_is_one_line(run_cli, fresh_registries, tmp_path):
    """A folder with no .py file loaded nothing without a word (a typo'd path went unnoticed); a YAML file
    given to --include was said not to exist."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_private.py").write_text("")
    (tmp_path / "sweep.yaml").write_text("name: s\n")
    for path, message in ((tmp_path / "empty", "the folder holds no .py file"),
                          (tmp_path / "sweep.yaml", "is not a .py file")):
        code, out, err = run_cli("--include", path, "list")
        assert code == 2 and out == "" and message in one_line(err), err
