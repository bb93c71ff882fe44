"""MSDNet: the contract, the reference layout and options, and loading reference checkpoints."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.backbones.checkpoint import load_reference_checkpoint
from bench.backbones.contract import Truncated, map_state
from bench.backbones.msdnet import MSDLayer, MSDNet, Transition
from bench.errors import ConfigError, UsageError
from bench.registry import BACKBONES, load_all

load_all()

FIXTURE = Path(__file__).parent / "fixtures" / "msdnet-cifar-budget-reference-keys.json"
PRESETS = ["msdnet-cifar-anytime", "msdnet-cifar-budget", "msdnet-imagenet-step4", "msdnet-imagenet-step6",
           "msdnet-imagenet-step7"]
# (name, options, exits, classes, image size): small inputs. The ImageNet-stem config ends on one scale like
# the presets (with other depths the reference's last block also computes finer scales no head reads).
SMALL = [
    ("msdnet-cifar-budget", {}, 5, 10, 32),
    ("msdnet-cifar-anytime", {}, 7, 10, 32),
    ("msdnet", {"data": "imagenet", "nBlocks": 4, "step": 2, "base": 2, "stepmode": "even", "nChannels": 8,
                "growthRate": 4, "grFactor": "1-2-4-4", "bnFactor": "1-2-4-4"}, 4, 7, 64),
    ("msdnet", {"nBlocks": 3, "prune": "min", "bottleneck": False, "grFactor": [1, 2], "bnFactor": [1, 1],
                "nChannels": 8}, 3, 5, 16),
]


def build(name, options=None, num_classes=10, image_size=32, in_channels=3):
    return BACKBONES.build(name, options or {}, num_classes=num_classes, in_channels=in_channels,
                           image_size=image_size)


@pytest.mark.parametrize("name,options,exits,classes,size", SMALL)
def test_exits_shapes_truncation_and_backward(name, options, exits, classes, size):
    torch.manual_seed(0)
    model = build(name, options, classes, size).eval()
    assert model.num_exits == exits
    x, y = torch.randn(2, 3, size, size), torch.randint(0, classes, (2,))
    with torch.no_grad():
        full = model(x)
        assert [tuple(o.shape) for o in full] == [(2, classes)] * exits
        for k in sorted({1, exits - 1}):
            part = Truncated(model, k)(x)
            assert len(part) == k and torch.equal(part[-1], full[k - 1])
    model.train()
    loss = sum(F.cross_entropy(o, y) for o in model(x))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ["msdnet-imagenet-step4", "msdnet-imagenet-step6", "msdnet-imagenet-step7"])
def test_imagenet_presets_exits_and_shapes(name):
    model = build(name, num_classes=1000, image_size=224).eval()
    assert model.num_exits == 5 and model.data == "imagenet"
    x = torch.randn(1, 3, 64, 64)  # the 224 geometry runs in tests/test_flops.py
    with torch.no_grad():
        full = model(x)
        assert [tuple(o.shape) for o in full] == [(1, 1000)] * 5
        assert torch.equal(model(x, upto=2)[-1], full[1])


def test_state_is_the_list_of_scales_and_boundaries_see_it():
    model = build("msdnet-cifar-budget").eval()
    seen = []

    def boundary(k, state):
        seen.append([tuple(t.shape[1:]) for t in state])
        return state, map_state(lambda t: t.detach(), state)

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        hooked = model(x, boundary=boundary)
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
    # Scales (channels, size) after each block: 3 scales, then 2 after layer 6's drop, 1 after layer 11's.
    assert [[s[1:] for s in block] for block in seen] == [
        [(32, 32), (16, 16), (8, 8)], [(32, 32), (16, 16), (8, 8)], [(16, 16), (8, 8)], [(16, 16), (8, 8)],
        [(8, 8)]]


def _layout(model: MSDNet) -> tuple[list[int], list[int]]:
    """(1-based layers after which exits sit, layers after which a transition follows)."""
    exits, transitions, layer = [], [], 0
    for block in model.blocks:
        for module in block:
            if isinstance(module, MSDLayer):
                layer += 1
            elif isinstance(module, Transition):
                transitions.append(layer)
        exits.append(layer)
    return exits, transitions


@pytest.mark.parametrize("name,exits,transitions", [
    # From the reference README configurations (see /work/shared/reference/msdnet-ranet-imta.md).
    ("msdnet-cifar-anytime", [4, 6, 8, 10, 12, 14, 16], [7, 13]),
    ("msdnet-cifar-budget", [1, 3, 6, 10, 15], [6, 11]),
    ("msdnet-imagenet-step4", [4, 8, 12, 16, 20], [6, 11, 16]),
])
def test_reference_layout(name, exits, transitions):
    assert _layout(build(name, num_classes=100)) == (exits, transitions)


@pytest.mark.parametrize("name,params", [("msdnet-cifar-budget", 2_078_924), ("msdnet-cifar-anytime", 3_067_960)])
def test_parameter_count_equals_reference_model(name, params):
    # Totals of the reference model built with the same flags (CIFAR-100).
    assert sum(p.numel() for p in build(name, num_classes=100).parameters()) == params


def test_presets_and_dashed_factors():
    assert set(PRESETS) <= set(BACKBONES.presets("msdnet"))
    p = BACKBONES.params("msdnet-imagenet-step7")
    assert (p.nBlocks, p.step, p.base, p.nChannels, p.growthRate, p.grFactor, p.bnFactor, p.data) == (
        5, 7, 7, 32, 16, [1, 2, 4, 4], [1, 2, 4, 4], "imagenet")
    assert BACKBONES.params("msdnet-cifar-budget").steps() == [1, 2, 3, 4, 5]
    assert BACKBONES.params("msdnet-cifar-anytime").steps() == [4, 2, 2, 2, 2, 2, 2]
    assert BACKBONES.params("msdnet", {"grFactor": "1-2", "bnFactor": "2-2"}).grFactor == [1, 2]


def test_data_auto_follows_image_size():
    assert build("msdnet", {"nBlocks": 1}, image_size=32).data == "cifar"
    assert build("msdnet", {"nBlocks": 1}, image_size=224).data == "imagenet"


@pytest.mark.parametrize("options,field", [
    ({"grFactor": [1, 2, 4], "bnFactor": [1, 2]}, "bnFactor"),
    ({"grFactor": "1-2-4-4", "bnFactor": "1-2-4"}, "bnFactor"),
    ({"nBlocks": 0}, "nBlocks"),
    ({"growthRate": 3, "grFactor": [1, 3], "bnFactor": [1, 1]}, "growthRate"),
    ({"grFactor": "1-two-4"}, "grFactor"),
    ({"grFactor": []}, "grFactor"),
    ({"stepmode": "linear"}, "stepmode"),
    ({"prune": "none"}, "prune"),
    ({"reduction": 1.5}, "reduction"),
    ({"colour": 1}, "colour"),
])
def test_inconsistent_options_name_the_option(options, field):
    with pytest.raises(ConfigError) as err:
        BACKBONES.params("msdnet", options)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_reduction_leaving_no_channels_is_a_config_error():
    with pytest.raises(ConfigError, match="reduction"):
        build("msdnet", {"reduction": 0.01, "nChannels": 2, "growthRate": 2})


# Reference checkpoints -------------------------------------------------------------------------------------------


def _reference_keys():
    return [(name, tuple(shape)) for name, shape in json.loads(FIXTURE.read_text())["keys"]]


def _reference_like_state(seed=0):
    """A state_dict with the reference's key names and shapes (random values)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in _reference_keys():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[name] = torch.randn(shape, generator=gen) * 0.1
    return state


def test_names_and_shapes_match_the_reference_state_dict():
    ours = [(k, tuple(v.shape)) for k, v in build("msdnet-cifar-budget", num_classes=100).state_dict().items()]
    assert ours == _reference_keys()


@pytest.mark.parametrize("wrap", ["raw", "module", "checkpoint", "file"])
def test_loader_accepts_reference_formats(wrap, tmp_path):
    state = _reference_like_state()
    if wrap == "raw":
        source = state
    else:
        prefixed = {"module." + k: v for k, v in state.items()}
        source = prefixed if wrap == "module" else {"epoch": 299, "arch": "msdnet", "state_dict": prefixed,
                                                    "best_prec1": 75.1, "optimizer": {"state": {}}}
        if wrap == "file":
            torch.save(source, tmp_path / "checkpoint_299.pth.tar")
            source = tmp_path / "checkpoint_299.pth.tar"
    model = build("msdnet-cifar-budget", num_classes=100)
    assert load_reference_checkpoint(model, source) is model
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_loaded_weights_give_the_same_logits_as_the_saving_model(tmp_path):
    torch.manual_seed(0)
    source = build("msdnet-cifar-budget", num_classes=100)
    load_reference_checkpoint(source, _reference_like_state(seed=1))
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, tmp_path / "c.pth")
    target = load_reference_checkpoint(build("msdnet-cifar-budget", num_classes=100), str(tmp_path / "c.pth"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(source.eval()(x), target.eval()(x)))


def test_checkpoints_without_num_batches_tracked_load():
    # Saved before PyTorch 0.4.1: BatchNorm had no step counter; it does not affect outputs.
    state = {k: v for k, v in _reference_like_state().items() if not k.endswith("num_batches_tracked")}
    load_reference_checkpoint(build("msdnet-cifar-budget", num_classes=100), state)


@pytest.mark.parametrize("change,words", [
    ("drop", ["1 missing keys", "classifier.4.linear.bias"]),
    ("extra", ["1 unexpected keys", "classifier.5.linear.weight"]),
    ("shape", ["1 shape mismatches", "classifier.4.linear.weight [10, 128] vs model [100, 128]"]),
])
def test_loader_is_strict(change, words):
    state = _reference_like_state()
    if change == "drop":
        del state["classifier.4.linear.bias"]
    elif change == "extra":
        state["classifier.5.linear.weight"] = torch.zeros(100, 128)
    else:
        state["classifier.4.linear.weight"] = torch.zeros(10, 128)
    model = build("msdnet-cifar-budget", num_classes=100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as err:
        load_reference_checkpoint(model, {"state_dict": state})
    message = str(err.value)
    assert all(w in message for w in words) and "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_loader_rejects_another_config_and_non_checkpoints(tmp_path):
    with pytest.raises(UsageError, match="missing keys.*unexpected keys|unexpected keys"):
        load_reference_checkpoint(build("msdnet-cifar-anytime", num_classes=100), _reference_like_state())
    with pytest.raises(UsageError, match="does not exist"):
        load_reference_checkpoint(build("tiny"), tmp_path / "nope.pth")
    with pytest.raises(UsageError, match="state_dict"):
        load_reference_checkpoint(build("tiny"), {"epoch": 3, "best_prec1": 1.0})
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UsageError, match="junk.pth"):
        load_reference_checkpoint(build("tiny"), tmp_path / "junk.pth")
