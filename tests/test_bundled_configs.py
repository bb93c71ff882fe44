from pathlib import Path

import pytest

import bench
from bench.config import load_sweep

CONFIGS = sorted((Path(bench.__file__).parent / "configs").glob("*.yaml"))


def test_the_default_and_paper_sweeps_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"default", "cifar100-msdnet", "imagenet-msdnet", "l2w-ablation", "fashion-mnist-tiny"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_bundled_sweeps_validate(path):
    sweep = load_sweep(path)
    assert sweep.name == path.stem
    assert sweep.trials()
    head = path.read_text().splitlines()[:12]
    assert any("Hardware" in line for line in head), "each shipped sweep states its hardware and time"


def test_default_sweep_is_the_issue_s_main_job():
    sweep = load_sweep(Path(bench.__file__).parent / "configs" / "default.yaml")
    trials = sweep.trials()
    assert {t.method["name"] for t in trials} == {"uniform", "distill", "l2w"}
    assert sorted({t.seed for t in trials}) == [0, 1, 2] and len(trials) == 9
    assert {t.data["name"] for t in trials} == {"digits"} and {t.backbone["name"] for t in trials} == {"tiny"}
