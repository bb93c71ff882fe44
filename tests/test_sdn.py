"""`sdn`: exits on torchvision CNNs and the CIFAR ResNet: exits, shapes, backward, truncation, the final exit is
the model's own classifier, local-only pretrained weights, bad cuts."""

import os

import pytest
import torch
import torchvision

from bench.backbones import build
from bench.backbones.checkpoint import local_weights_path
from bench.backbones.sdn import CifarResNet
from bench.errors import ConfigError
from bench.registry import BACKBONES, load_all

load_all()


def _model(section, num_classes=10, image_size=32, in_channels=3):
    torch.manual_seed(0)
    return build(section, num_classes=num_classes, in_channels=in_channels, image_size=image_size)


@pytest.mark.parametrize("section, image_size, exits", [
    ({"name": "sdn-cifar-resnet56"}, 32, 7),
    ({"name": "sdn-resnet18"}, 64, 4),
    ({"name": "sdn-resnet50"}, 64, 6),
    ({"name": "sdn", "arch": "mobilenet_v2", "cuts": ["features.3", "features.7"], "head": "pool_linear"},
     32, 3),
])
def test_exits_shapes_backward_truncation(section, image_size, exits, check_contract):
    check_contract(_model(section, image_size=image_size), image_size, exits)


@pytest.mark.parametrize("arch, cuts, image_size", [
    ("resnet18", ["layer1", "layer2.1", "layer3"], 64),
    ("mobilenet_v2", ["features.2", "features.13"], 32),
    ("squeezenet1_1", ["features.5"], 64),
    ("cifar_resnet20", ["layer1.1", "layer2"], 32),
])
def test_final_exit_is_the_models_own_classifier(arch, cuts, image_size):
    torch.manual_seed(0)
    whole = CifarResNet(20, 10) if arch.startswith("cifar") else torchvision.models.get_model(arch, num_classes=10)
    model = _model({"name": "sdn", "arch": arch, "cuts": cuts}, image_size=image_size)  # same seed: same trunk
    whole.eval(), model.eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], whole(x), rtol=0, atol=0)


def test_sdn_pool_reduces_like_the_sdn_code():
    # ResNet-56 maps are 32/16/8 wide: kernels 8/4/2 give 4x4 maps for every head.
    model = _model({"name": "sdn-cifar-resnet56"}, num_classes=100)
    assert [head[2].in_features for head in model.heads[:-1]] == [16 * 16] * 2 + [32 * 16] * 2 + [64 * 16] * 2
    assert all(0 <= head[0].alpha.item() <= 1 for head in model.heads[:-1])


def test_exits_sit_at_sdn_fractions_of_the_cost():
    # SDN places ResNet-56's six internal exits at about 15, 30, ..., 90 % of the network's multiply-adds.
    from bench.flops import per_exit_cost

    macs = per_exit_cost(_model({"name": "sdn-cifar-resnet56"}, num_classes=100), 32).macs
    fractions = [m / macs[-1] for m in macs[:-1]]
    assert fractions == pytest.approx([0.15, 0.30, 0.45, 0.60, 0.75, 0.90], abs=0.02)


def test_other_input_channels():
    for arch in ("cifar_resnet20", "resnet18"):
        model = _model({"name": "sdn", "arch": arch, "cuts": ["layer1"]}, in_channels=1, image_size=16)
        assert [tuple(o.shape) for o in model(torch.randn(2, 1, 16, 16))] == [(2, 10)] * 2


def test_pretrained_loads_only_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    section = {"name": "sdn", "arch": "mobilenet_v3_small", "cuts": ["features.3"], "pretrained": True}
    with pytest.raises(ConfigError, match="pretrained.*no local weights"):
        _model(section, num_classes=1000)

    torch.manual_seed(1)
    weights = torchvision.models.mobilenet_v3_small().state_dict()
    path = local_weights_path("mobilenet_v3_small")
    assert path.startswith(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    torch.save(weights, path)
    model = _model(section, num_classes=1000)
    assert torch.equal(model.stages[0].features_0[0].weight, weights["features.0.0.weight"])
    assert torch.equal(model.heads[-1][2][3].weight, weights["classifier.3.weight"])
    # Other class counts keep every weight but the last linear's.
    model = _model(section, num_classes=10)
    assert torch.equal(model.stages[1].features_4.block[0][0].weight, weights["features.4.block.0.0.weight"])
    assert model.heads[-1][2][3].weight.shape == (10, 1024)


@pytest.mark.parametrize("values, message", [
    ({"arch": "resnet18", "cuts": ["layer5"]}, r"cuts: 'layer5' is not a layer of resnet18.*valid: .*layer4\.1"),
    ({"arch": "resnet18", "cuts": ["layer1.0.conv1"]}, r"cuts: 'layer1\.0\.conv1'"),
    ({"arch": "resnet18", "cuts": ["layer3", "layer1"]}, "cuts: must be distinct points in forward order"),
    ({"arch": "resnet18", "cuts": ["layer2.1", "layer2"]}, "cuts: must be distinct"),
    ({"arch": "resnet18", "cuts": []}, "cuts"),
    ({"arch": "resnet7"}, "arch: unknown 'resnet7'; valid: cifar_resnet20"),
    ({"arch": "googlenet", "cuts": ["conv1"]}, r"arch: googlenet \(GoogLeNet\) cannot be split"),
    ({"head": "conv"}, "head"),
    ({"pool_size": 0}, "pool_size"),
    ({"pretrained": True}, "pretrained: cifar_resnet56 has no pretrained weights"),
])
@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")
def test_bad_options_name_the_option(values, message):
    with pytest.raises(ConfigError, match=message):
        BACKBONES.build("sdn", values, num_classes=10, in_channels=3, image_size=32)
