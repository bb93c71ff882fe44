"""RANet: exits, shapes, backward, truncation, the reference's parameter counts and MACs, bad options."""

import pytest
import torch
import torch.nn.functional as F

from bench.backbones import build, map_state
from bench.errors import ConfigError
from bench.registry import BACKBONES, load_all

load_all()

# yangle15/RANet-pytorch's op_counter.py run on its own RANet (100 classes at 32x32, 1000 at 224x224):
# cumulative multiply-adds and parameters per exit, earlier heads included.
REFERENCE = {
    "ranet-cifar": dict(
        macs=[8372324, 21788360, 32878892, 41570192, 53283828, 58990680],
        params=[358660, 899880, 1304995, 1800711, 2188193, 2617261]),
    "ranet-cifar-sh": dict(
        macs=[15826020, 31306440, 44690220, 50404752, 60712628, 63717656, 90255228, 94997472],
        params=[482052, 1097000, 1511586, 1914854, 2223662, 2523154, 2952906, 3354710]),
    "ranet-imagenet": dict(
        macs=[246472360, 631164048, 860403190, 1041144878, 1869847124, 2160379452, 2734279235, 2828311039],
        params=[9916712, 37916432, 48345820, 65121348, 85601768, 113060656, 121474513, 131123991]),
}
# The derived README-CIFAR figures of the reference notes (CIFAR-10 heads), M MACs.
NOTES_RANET_CIFAR = [8.36, 21.77, 32.84, 41.52, 53.23, 58.92]

# A narrow ImageNet-style RANet (same stem, heads and 1-2-3-4 layout as the preset) that is quick on CPU.
SMALL_IMAGENET = {"name": "ranet-imagenet", "nChannels": 4, "growthRate": 4, "step": 2}


def _model(section, num_classes=10, image_size=32):
    torch.manual_seed(0)
    return build(section, num_classes=num_classes, in_channels=3, image_size=image_size)


def _cumulative_params(model):
    """Parameters of the stem and of every block and head run up to each exit."""
    def count(m):
        return sum(p.numel() for p in m.parameters())

    total, out = count(model.first), []
    for k, (ii, blocks) in enumerate(model.plan):
        total += sum(count(model.flows[ii][i]) for i in blocks) + count(model.heads[k])
        out.append(total)
    return out


@pytest.mark.parametrize("section, image_size, exits", [
    ({"name": "ranet-cifar"}, 32, 6),
    ({"name": "ranet-cifar-sh"}, 32, 8),
    (SMALL_IMAGENET, 64, 8),
    ({"name": "ranet-cifar", "bnAfter": False, "scale_list": "1-2-2", "grFactor": "2-1-1", "bnFactor": "2-1-1",
      "nBlocks": 1, "block_step": 1, "step": 1}, 16, 3),
])
def test_exits_shapes_backward_truncation(section, image_size, exits, check_contract):
    check_contract(_model(section, image_size=image_size), image_size, exits)


def test_boundary_acts_on_the_nested_state():
    # Cutting the gradient between stage 1 and 2 leaves the first block with exit 1's gradient only.
    model = _model({"name": "ranet-cifar"})
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])

    def grads(boundary):
        model.zero_grad()
        outputs = model(x, upto=2, boundary=boundary)
        F.cross_entropy(outputs[1], y).backward()
        return [p.grad for p in model.flows[0][0].parameters()]

    assert all(g is not None and g.abs().sum() > 0 for g in grads(None))
    cut = grads(lambda k, s: (s, map_state(torch.Tensor.detach, s)) if k == 0 else (s, s))
    assert all(g is None or g.abs().sum() == 0 for g in cut)


@pytest.mark.parametrize("preset, num_classes, image_size", [
    ("ranet-cifar", 100, 32), ("ranet-cifar-sh", 100, 32), ("ranet-imagenet", 1000, 224)])
def test_parameters_match_the_reference_exactly(preset, num_classes, image_size):
    model = _model({"name": preset}, num_classes, image_size)
    assert _cumulative_params(model) == REFERENCE[preset]["params"]
    assert sum(p.numel() for p in model.parameters()) == REFERENCE[preset]["params"][-1]


def test_macs_within_two_percent_of_the_reference():
    from bench.flops import per_exit_cost

    model = _model({"name": "ranet-cifar"}, 100, 32)
    report = per_exit_cost(model, 32)
    assert report.params == REFERENCE["ranet-cifar"]["params"]
    # fvcore adds BN and the bilinear resizes, the reference adds ReLUs: about +0.4..1.0 % here.
    for ours, ref, notes in zip(report.macs, REFERENCE["ranet-cifar"]["macs"], NOTES_RANET_CIFAR):
        assert abs(ours / ref - 1) < 0.02
        assert abs(ours / (notes * 1e6) - 1) < 0.02


@pytest.mark.parametrize("values, option", [
    ({"grFactor": [4, 2]}, "grFactor"),
    ({"bnFactor": "4-2-1-1"}, "bnFactor"),
    ({"scale_list": [2, 3, 4]}, "scale_list"),
    ({"scale_list": [1, 3, 4]}, "scale_list"),
    ({"nBlocks": 0}, "nBlocks"),
    ({"stepmode": "lin_grow"}, "stepmode"),
    ({"compress_factor": 0.01}, "compress_factor"),
    ({"grFactor": "4-x-1"}, "grFactor"),
    ({"data": "mnist"}, "data"),
    ({"growth": 6}, "growth"),
])
def test_bad_options_name_the_option(values, option):
    with pytest.raises(ConfigError, match=option):
        BACKBONES.build("ranet-cifar", values, num_classes=10, in_channels=3, image_size=32)
