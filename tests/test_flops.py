"""Per-exit cost: the reference MSDNet table through `exitbench flops`, the counters, and bad input."""

import json

import pytest
import torch
from torch import nn

from bench.backbones.contract import MultiExitNet, Truncated
from bench.errors import UsageError
from bench.flops import count_macs, default_input, params_used, per_exit_cost
from bench.registry import BACKBONES, load_all

load_all()

# The reference op counter's cumulative MACs (M) per exit (conv + linear + ReLU + pooling, no BN) and,
# where given, params (M, as printed to 0.01). CIFAR: 32x32, 100 classes; ImageNet: 224x224, 1000 classes.
REFERENCE = {
    "msdnet-cifar-anytime": ([15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94], None),
    "msdnet-cifar-budget": ([6.86, 14.35, 27.54, 41.71, 58.48], None),
    "msdnet-imagenet-step4": ([339.90, 685.46, 1008.16, 1254.47, 1360.53], [4.24, 8.77, 13.07, 16.75, 23.96]),
    "msdnet-imagenet-step6": ([514.66, 1171.18, 1844.52, 2501.40, 2742.06], None),
    "msdnet-imagenet-step7": ([615.69, 1436.39, 2283.21, 2967.42, 3253.79], [8.76, 20.15, 31.73, 41.86, 62.31]),
}
TOLERANCE = 0.02  # fvcore counts BN (2 per element) and not ReLU, and the bias of linears not at all


@pytest.mark.parametrize("preset", [
    "msdnet-cifar-anytime", "msdnet-cifar-budget", "msdnet-imagenet-step4",
    pytest.param("msdnet-imagenet-step6", marks=pytest.mark.slow),
    pytest.param("msdnet-imagenet-step7", marks=pytest.mark.slow),
])
def test_reference_table(preset, run_cli):
    code, out, err = run_cli("flops", preset, "--json")
    assert code == 0, err
    report = json.loads(out)
    macs_ref, params_ref = REFERENCE[preset]
    imagenet = "imagenet" in preset
    assert (report["backbone"], report["counter"]) == (preset, "fvcore")
    assert (report["image_size"], report["num_classes"]) == ((224, 1000) if imagenet else (32, 100))
    assert [e["exit"] for e in report["exits"]] == list(range(1, len(macs_ref) + 1))
    for e, ref in zip(report["exits"], macs_ref):
        assert isinstance(e["macs"], int) and isinstance(e["params"], int)
        assert abs(e["macs"] / 1e6 - ref) <= TOLERANCE * ref, (e["exit"], e["macs"] / 1e6, ref)
    if params_ref:
        assert [round(e["params"] / 1e6, 2) for e in report["exits"]] == params_ref


def _tiny(image_size=32):
    return BACKBONES.build("tiny", {}, num_classes=10, image_size=image_size)


@pytest.mark.parametrize("counter", ["fvcore", "torch"])
def test_one_run_equals_each_truncated_forward(counter):
    # per_exit_cost measures all exits in one run; the numbers must be those of Truncated(model, k).
    model = _tiny()
    report = per_exit_cost(model, 32, counter=counter)
    x = torch.zeros(1, 3, 32, 32)
    model.eval()
    assert report.macs == [count_macs(Truncated(model, k), x, counter) for k in range(1, 5)]
    assert report.params == [params_used(Truncated(model, k), x) for k in range(1, 5)]
    assert report.params[-1] == sum(p.numel() for p in model.parameters())
    assert report.counter == counter and report.counter_version


def test_msdnet_torch_counter_equals_truncated_forwards():
    # MSDNet's exit k does not read the finer scales its stages compute: they must still be counted.
    model = BACKBONES.build("msdnet-cifar-budget", {}, num_classes=100).eval()
    x = torch.zeros(1, 3, 32, 32)
    report = per_exit_cost(model, 32, counter="torch")
    assert report.macs == [count_macs(Truncated(model, k), x, "torch") for k in range(1, 6)]
    assert report.params == [params_used(Truncated(model, k), x) for k in range(1, 6)]
    fv = per_exit_cost(model, 32, counter="fvcore").macs
    # fvcore adds BN and pooling to the same convs and linears; the torch counter has neither.
    assert all(t < f < 1.05 * t for t, f in zip(report.macs, fv))


def test_tiny_flops_cli_defaults_and_text(run_cli):
    code, out, _ = run_cli("flops", "tiny", "--json")
    report = json.loads(out)
    assert code == 0 and (report["image_size"], report["num_classes"], report["in_channels"]) == (32, 10, 3)
    assert report["exits"] == [{"exit": e.exit, "macs": e.macs, "params": e.params}
                               for e in per_exit_cost(_tiny(), 32).exits]
    code, out, _ = run_cli("flops", "tiny", "--counter", "torch", "--image-size", "16", "--in-channels", "1",
                           "--num-classes", "3")
    lines = out.strip().splitlines()
    assert code == 0 and "16x16x1" in lines[0] and "3 classes" in lines[0] and "torch" in lines[0]
    assert len(lines) == 2 + 4 and all(line.split()[1].endswith("M") for line in lines[2:])


def test_options_and_size_pick_the_msdnet_stem(run_cli):
    code, out, err = run_cli("flops", "msdnet", "nBlocks=2", "grFactor=1-2-4-4", "bnFactor=1-2-4-4",
                             "--image-size", "224", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["image_size"], report["num_classes"], len(report["exits"])) == (224, 1000, 2)


class _PoolNet(MultiExitNet):
    """One exit: max-pool 3/2 then a linear head; the exact count is known."""

    num_exits = 1

    def __init__(self):
        super().__init__()
        self.pool, self.fc = nn.MaxPool2d(3, 2, 1), nn.Linear(4 * 4 * 4, 5)

    def stage(self, k, state):
        return self.pool(state)

    def head(self, k, state):
        return self.fc(state.flatten(1))


def test_pooling_is_counted_as_the_reference_does():
    report = per_exit_cost(_PoolNet(), 8, in_channels=4)
    assert report.macs == [4 * 4 * 4 * 9 + 64 * 5]  # output elements x kernel area, then the linear's MACs
    assert report.params == [64 * 5 + 5]


class _CdistNet(MultiExitNet):
    """An operator fvcore has no count for (cdist: real multiply-adds)."""

    num_exits = 1

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def stage(self, k, state):
        flat = state.flatten(2).transpose(1, 2)
        return torch.cdist(flat, flat).mean(dim=2)

    def head(self, k, state):
        return self.fc(state.flatten(1)[:, :8])


def test_uncountable_operators_fail_loudly():
    with pytest.raises(UsageError, match=r"aten::cdist.*--counter torch"):
        per_exit_cost(_CdistNet(), 4, in_channels=2)
    per_exit_cost(_CdistNet(), 4, in_channels=2, counter="torch")  # the stand-in skips what it cannot count


def test_counting_restores_training_mode():
    model = _tiny().train()
    per_exit_cost(model, 32)
    assert model.training and all(m.training for m in model.modules())


def test_default_input():
    assert default_input(BACKBONES.params("msdnet-imagenet-step4")) == (224, 1000)
    assert default_input(BACKBONES.params("msdnet-cifar-budget")) == (32, 100)
    assert default_input(BACKBONES.params("tiny")) == (32, 10)


@pytest.mark.parametrize("args,words", [
    (["no-such-net"], ["unknown backbone 'no-such-net'", "msdnet-cifar-budget", "tiny"]),
    (["msdnet", "grFactor=1-2-4", "bnFactor=1-2"], ["bnFactor", "grFactor"]),
    (["msdnet", "nBlocks=0"], ["nBlocks"]),
    (["msdnet", "depth=3"], ["depth"]),
    (["tiny", "--image-size", "0"], ["--image-size"]),
    (["tiny", "--counter", "ptflops"], ["--counter"]),
    (["tiny", "novalue"], ["novalue"]),
])
def test_bad_input_is_one_line_exit_2(args, words, run_cli):
    code, out, err = run_cli("flops", *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err


def test_unknown_counter_in_the_api():
    with pytest.raises(UsageError, match="fvcore, torch"):
        per_exit_cost(_tiny(), 32, counter="ptflops")
