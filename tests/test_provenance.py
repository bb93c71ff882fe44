"""What made a number is recorded with it: every trial stores the machine it ran on (device, CPU model, CPU
instruction set, math libraries), its commit (with a dirty flag) and a checksum of the dataset files it read;
reports print where the trials ran and warn, one line each, when one comparison mixes machines, library
versions or dataset files."""

import hashlib
import importlib.resources
from pathlib import Path

import pytest
import torch

from bench.config import validate_trial
from bench.report import build
from bench.results import ResultRecord, load, write
from bench.trial import train

TINY = {"data": {"name": "digits", "image_size": 8, "val_size": 0.15}, "backbone": {"name": "tiny", "widths": [4, 8]},
        "epochs": 1, "batch_size": 64, "progress": False, "device": "cpu"}


def sha256_of_files(paths):
    """The checksum written out: sha256 over 'name sha256(bytes)' lines in name order."""
    lines = "".join(f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in sorted(paths, key=str))
    return hashlib.sha256(lines.encode()).hexdigest()


def test_a_new_trial_records_its_machine_commit_and_data_files(tmp_path):
    record = train.run(validate_trial(TINY), tmp_path / "run")
    m = record.machine
    assert m["device"] == "cpu" and m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["cpu"] and "parallel" not in m["math"] and m["math"].count(";") == 2  # backend; BLAS; oneDNN
    digits = Path(str(importlib.resources.files("sklearn.datasets.data") / "digits.csv.gz"))
    assert record.data_info["files_sha256"] == sha256_of_files([digits])
    assert record.git_commit is None or len(record.git_commit.removesuffix("-dirty")) == 40
    runs = load(_stored(record, tmp_path / "sweep")).runs
    assert runs.loc[0, "machine.cpu"] == m["cpu"] and runs.loc[0, "data.files_sha256"] == sha256_of_files([digits])


def _stored(record: ResultRecord, folder: Path) -> Path:
    write(record, folder)
    return folder


def _trial(tid: str, seed: int, cpu: str, files: str = "abc") -> ResultRecord:
    config = validate_trial({**TINY, "seed": seed}).model_dump(mode="json")
    return ResultRecord(
        trial_id=tid, config=config, seed=seed, versions={"torch": "2.0", "torch_threads": "1"}, git_commit="abc",
        machine={"device": "cpu", "cpu": cpu, "cpu_capability": "AVX2", "math": "OpenMP; MKL 1; oneDNN v3"},
        data_info={"dataset": "digits", "files_sha256": files},
        exits=[{"exit": k + 1, "top1": 50.0 + 10 * k, "top5": 100.0, "macs": 1e6 * (k + 1), "params": 10}
               for k in range(2)],
        budgets=[{"p": 1, "test_acc": 55.0, "val_acc": 55.0, "expected_macs": 1.5e6, "exit_fractions": [0.5, 0.5],
                  "thresholds": [0.9, None]}])


@pytest.mark.parametrize("second,warned", [("Intel Xeon", "CPU models"), ("AMD EPYC", None)])
def test_a_comparison_across_machines_warns_in_one_line(tmp_path, capsys, second, warned):
    a, b = tmp_path / "a", tmp_path / "b"
    for s in range(2):
        write(_trial(f"u{s}", s, "AMD EPYC"), a)
        write(_trial(f"v{s}", s, second), b)
    build.build_leaderboard([str(a), str(b)], tmp_path / "out")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("exitbench: warning:")]
    if warned is None:
        assert not lines
    else:
        assert len(lines) == 1 and warned in lines[0] and "Intel Xeon" in lines[0] and "AMD EPYC" in lines[0]
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "on AMD EPYC (AVX2)" in board


def test_other_dataset_files_warn_too(tmp_path, capsys):
    write(_trial("u0", 0, "AMD EPYC", files="abc"), tmp_path / "s")
    write(_trial("u1", 1, "AMD EPYC", files="def"), tmp_path / "s")
    build.build_report(tmp_path / "s", tmp_path / "out", plots=False)
    err = capsys.readouterr().err
    assert "exitbench: warning: digits: trials differ in dataset files" in err
