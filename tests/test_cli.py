import json
import subprocess
import sys

import pytest


def test_list_shows_registries(run_cli):
    code, out, _ = run_cli("list")
    assert code == 0
    assert "backbones:" in out and "tiny" in out and "digits" in out and "uniform" in out


def test_list_json(run_cli):
    code, out, _ = run_cli("list", "--json")
    listing = json.loads(out)
    assert code == 0 and set(listing) == {"backbones", "datasets", "methods", "sweeps"}
    assert {"default", "l2w-ablation"} <= {s["name"] for s in listing["sweeps"]}
    tiny = next(r for r in listing["backbones"] if r["name"] == "tiny")
    assert tiny["params"]["widths"] == [16, 32, 48, 64]


def test_config_show_prints_defaulted_yaml(run_cli, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("epochs: 2\n")
    code, out, _ = run_cli("config", "show", path, "optim.lr=0.3")
    assert code == 0 and "epochs: 2" in out and "lr: 0.3" in out and "weight_decay" in out


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("optim: {lrate: 0.1}\n", [], "unknown field 'optim.lrate'"),
        ("optim: {lr: -0.1}\n", [], "optim.lr"),
        ("epochs: 2\n", ["optim.lr=-1"], "optim.lr"),
        ("epochs: 2\n", ["oops"], "dotted.key=value"),
    ],
)
def test_config_show_bad_input_exits_2_with_one_line(run_cli, tmp_path, text, overrides, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    code, out, err = run_cli("config", "show", path, *overrides)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_unknown_command_and_missing_file_exit_2(run_cli, tmp_path):
    code, _, err = run_cli("frobnicate")
    assert code == 2 and err.count("\n") == 1
    code, _, err = run_cli("config", "show", tmp_path / "missing.yaml")
    assert code == 2 and "does not exist" in err


def test_console_script_help_and_exit_status():
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "list" in done.stdout and "sweep" in done.stdout
    done = subprocess.run([sys.executable, "-m", "bench", "config", "show", "/nonexistent.yaml"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_overrides_may_follow_flags(run_cli):
    """KEY=VALUE overrides before or after a command's flags give the same result; unknown flags still exit 2."""
    code, before, _ = run_cli("flops", "tiny", "widths=[8,16]", "--json")
    assert code == 0
    code, after, _ = run_cli("flops", "tiny", "--json", "widths=[8,16]")
    assert code == 0 and json.loads(after) == json.loads(before) and len(json.loads(after)["exits"]) == 2
    code, out, err = run_cli("flops", "tiny", "--json", "--bogus")
    assert code == 2 and out == "" and "unrecognized arguments: --bogus" in err and err.count("\n") == 1
