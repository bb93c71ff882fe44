"""Benchmark scripts: bad arguments are one line on stderr and exit 2, before any timing starts."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "l2w_speed.py"
STRATEGY_SPEED = SCRIPT.parent / "strategy_speed.py"


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "--rounds: expected an integer >= 1, got '0'"),
    (["--batch", "1"], "--batch: expected an integer >= 2, got '1'"),
    (["--threads", "two"], "--threads: expected an integer >= 1, got 'two'"),
    (["--modes", "fast"], "--modes: invalid choice: 'fast'"),
    (["--backbone", "nope"], "--backbone 'nope' is not registered; one of msdnet"),
])
def test_l2w_speed_bad_arguments(args, message):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr


def test_cli_startup_bad_arguments():
    script = SCRIPT.parent / "cli_startup.py"
    done = subprocess.run([sys.executable, str(script), "--runs", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1
    assert "--runs: expected an integer >= 1, got '0'" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats: expected an integer >= 1, got '0'"),
    (["--batch", "1"], "--batch: expected an integer >= 2, got '1'"),
    (["--methods", "uniform", "fast"], "--methods 'fast' is not registered; one of "),
    (["--backbone", "nope"], "--backbone 'nope' is not registered; one of msdnet"),
])
def test_strategy_speed_bad_arguments(args, message):
    done = subprocess.run([sys.executable, str(STRATEGY_SPEED), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr
    if "--methods" in args:
        assert "pcgrad" in done.stderr and "meta-gf" in done.stderr  # the valid names are listed


DATA_LOADING = SCRIPT.parent / "data_loading.py"


def test_data_loading_profiles_one_trial_of_a_sweep():
    config = Path(__file__).resolve().parent.parent / "bench" / "configs" / "default.yaml"
    done = subprocess.run([sys.executable, str(DATA_LOADING), "--trial", str(config), "--steps", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "digits x tiny x uniform, batch 64, 0 loader workers, 1 thread(s), 3 steps" in done.stdout
    share = float(done.stdout.split("loader share ")[1].split(" %")[0])
    assert 0 < share < 100


@pytest.mark.parametrize("args, message", [
    (["--trial", "nope.yaml"], "--trial nope.yaml: "),
    (["--trial", "x.yaml", "--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
])
def test_data_loading_bad_arguments(args, message):
    done = subprocess.run([sys.executable, str(DATA_LOADING), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers: expected an integer >= 1, got '0'"),
    (["--workers", "1", "2", "--batch", "63"], "--batch 63 does not split evenly over 2 workers"),
    (["--method", "ztw", "--warmup", "0", "--steps", "1"], "--method ztw needs --warmup + --steps >= 2"),
    (["--method", "nope"], "--method 'nope' is not registered"),
])
def test_ddp_scaling_bad_arguments(args, message):
    script = SCRIPT.parent / "ddp_scaling.py"
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--batches", "0"], "--batches: expected an integer >= 1, got '0'"),
    (["--threads", "two"], "--threads: expected an integer >= 1, got 'two'"),
])
def test_eval_speed_bad_arguments(args, message):
    script = SCRIPT.parent / "eval_speed.py"
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr
