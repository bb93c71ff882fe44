"""`sdn`: exits on a standard CNN (Shallow-Deep Networks, Kaya et al. 2019; as gmum/Zero-Time-Waste uses it).

A torchvision classification model (or our CIFAR ResNet) is cut at named layers: stage k runs the layers
after cut k-1 up to and including cut k, and a small head reads its output. The last stage runs the rest of
the trunk and the model's own classifier is the final exit. Splitting is explicit: each supported family
lists its trunk children in forward order and its classifier tail (pooling/flatten that its forward does
functionally included); a cut may name any trunk child or, recursively, any child of an nn.Sequential
among them (`layer2.1`, `features.7`) -- never a layer inside a block with a residual path.

Heads: `pool_linear` (global average pool, linear) or `sdn_pool` (the SDN code's mixed pooling
alpha*max + (1-alpha)*avg with kernel = stride = side // pool_size, i.e. down to about pool_size x pool_size,
alpha learned from U(0,1) without a sigmoid, then linear; fixed-size pools, as in the original SDN code,
rather than ZTW's adaptive ones, which fvcore cannot count). SDN's ResNet heads read a block's sum before
its final ReLU; ours read the block's output (after it), since the cut is at the module boundary.

`pretrained: true` loads torchvision's ImageNet weights from the local torch hub cache only
($TORCH_HOME/hub/checkpoints, see `torch.hub.get_dir()`); nothing is ever downloaded. With num_classes other
than the weights' the final classifier keeps its fresh initialisation; with in_channels other than 3 so does
the first conv (replaced to take the data's channels).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from bench.backbones.checkpoint import read_local_weights
from bench.backbones.contract import MultiExitNet, leaves, sequential_head_embedded
from bench.errors import ConfigError
from bench.registry import BACKBONES, Params


class SDNParams(Params):
    arch: str = Field("cifar_resnet56", description="torchvision classification model name or cifar_resnet<6n+2>")
    cuts: list[str] = Field(default_factory=lambda: ["layer1.3", "layer1.7", "layer2.2", "layer2.6", "layer3.1",
                                                     "layer3.5"], min_length=1,
                            description="module names after which an exit is placed, in forward order")
    head: Literal["pool_linear", "sdn_pool"] = "sdn_pool"
    pool_size: int = Field(4, ge=1, description="sdn_pool output side (smaller maps are kept whole)")
    pretrained: bool = Field(False, description="torchvision ImageNet weights, from the local torch hub cache only")


# CIFAR ResNet ------------------------------------------------
class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): 3x3 stem, three stages of n basic blocks at 16/32/64 channels.
    Shape-changing shortcuts are 1x1 conv + BN (option B, as SDN's ResNet-56); torchvision's attribute names."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        from torchvision.models.resnet import BasicBlock  # torchvision.models takes ~1 s to import: only when built

        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        c_in, stages = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                down = None
                if s != 1 or c_in != width:
                    down = nn.Sequential(nn.Conv2d(c_in, width, 1, s, bias=False), nn.BatchNorm2d(width))
                blocks.append(BasicBlock(c_in, width, s, down))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


CIFAR_RESNETS = {f"cifar_resnet{d}": d for d in (20, 32, 44, 56, 110)}


# families ----------------------------------------------------
def _flat(m):  # the model's own pooling module, then torch.flatten as its forward does
    return [m.avgpool, nn.Flatten(1)]


def _global_pool():  # F.adaptive_avg_pool2d / x.mean([2, 3]) in the model's forward
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]


# model class -> (trunk children in forward order, classifier tail as its forward computes it)
FAMILIES = {
    "ResNet": (("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
               lambda m: [*_flat(m), m.fc]),
    "CifarResNet": (("conv1", "bn1", "relu", "layer1", "layer2", "layer3"), lambda m: [*_flat(m), m.fc]),
    "VGG": (("features",), lambda m: [*_flat(m), m.classifier]),
    "AlexNet": (("features",), lambda m: [*_flat(m), m.classifier]),
    "MobileNetV2": (("features",), lambda m: [*_global_pool(), m.classifier]),
    "MobileNetV3": (("features",), lambda m: [*_flat(m), m.classifier]),
    "EfficientNet": (("features",), lambda m: [*_flat(m), m.classifier]),
    "ConvNeXt": (("features",), lambda m: [m.avgpool, m.classifier]),
    "RegNet": (("stem", "trunk_output"), lambda m: [*_flat(m), m.fc]),
    "MNASNet": (("layers",), lambda m: [*_global_pool(), m.classifier]),
    "ShuffleNetV2": (("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"),
                     lambda m: [*_global_pool(), m.fc]),
    "DenseNet": (("features",), lambda m: [nn.ReLU(), *_global_pool(), m.classifier]),
    "SqueezeNet": (("features",), lambda m: [m.classifier, nn.Flatten(1)]),
}


def _is_sequential(m: nn.Module) -> bool:
    # Only containers whose forward is plain chaining can be cut inside.
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def cut_names(units: list[tuple[str, nn.Module]]) -> list[str]:
    """Every name a cut may use, in forward order."""
    out = []
    for name, m in units:
        out.append(name)
        if _is_sequential(m):
            out += cut_names([(f"{name}.{c}", child) for c, child in m.named_children()])
    return out


def split_units(units: list[tuple[str, nn.Module]], cuts: list[str], arch: str) -> list[list[tuple[str, nn.Module]]]:
    """Expand Sequential containers just enough that every cut is a unit boundary, then split after each cut.
    Returns len(cuts) + 1 groups (the last is what runs before the classifier; it may be empty)."""
    valid = cut_names(units)
    for cut in cuts:
        if cut not in valid:
            raise ConfigError(f"backbone.cuts: {cut!r} is not a layer of {arch} that can be cut; valid: "
                              f"{', '.join(valid)}")
        while not any(name == cut or name.startswith(cut + ".") for name, _ in units):
            i = next(i for i, (name, _) in enumerate(units) if cut.startswith(name + "."))
            name, m = units[i]
            units = units[:i] + [(f"{name}.{c}", child) for c, child in m.named_children()] + units[i + 1:]
    ends = []
    for cut in cuts:  # a cut ends after its last unit (a container may have been expanded by a later cut)
        ends.append(max(i for i, (name, _) in enumerate(units) if name == cut or name.startswith(cut + ".")) + 1)
    if any(b <= a for a, b in zip(ends, ends[1:])):
        raise ConfigError(f"backbone.cuts: must be distinct points in forward order, got {cuts}")
    bounds = [0, *ends, len(units)]
    return [units[a:b] for a, b in zip(bounds, bounds[1:])]


# heads -------------------------------------------------------
class MixedPool(nn.Module):
    """SDN's pooling: alpha*max + (1-alpha)*avg over kernel = stride = `kernel` windows; alpha ~ U(0,1),
    learned, not squashed (as in the SDN code)."""

    def __init__(self, kernel: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(1))
        self.max, self.avg = nn.MaxPool2d(kernel), nn.AvgPool2d(kernel)

    def forward(self, x):
        avg = self.avg(x)
        return avg + self.alpha * (self.max(x) - avg)


def make_head(kind: str, shape: torch.Size, num_classes: int, pool_size: int) -> nn.Sequential:
    """A head for a (1, C, H, W) feature map."""
    c, side = shape[1], min(shape[2], shape[3])
    if kind == "pool_linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(c, num_classes))
    # SDN's reduction: kernel side // pool_size (a 14x14 map pools 3x3 windows to 4x4); maps smaller than
    # 2 * pool_size are used whole.
    kernel = side // pool_size
    pool = MixedPool(kernel) if kernel > 1 else nn.Identity()
    with torch.no_grad():
        features = pool(torch.zeros(shape)).numel()
    return nn.Sequential(pool, nn.Flatten(1), nn.Linear(features, num_classes))


# model -------------------------------------------------------
def build_classifier(arch: str, num_classes: int, in_channels: int, pretrained: bool) -> nn.Module:
    if arch in CIFAR_RESNETS:
        if pretrained:
            raise ConfigError(f"backbone.pretrained: {arch} has no pretrained weights; set pretrained=false")
        return CifarResNet(CIFAR_RESNETS[arch], num_classes, in_channels)
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise ConfigError(f"backbone.arch: unknown {arch!r}; valid: {', '.join([*CIFAR_RESNETS, *available])}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if pretrained:
        path, state = read_local_weights(arch)
        own = model.state_dict()
        fresh = {k for k, v in state.items() if k in own and v.shape != own[k].shape}  # the resized classifier
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
        if set(missing) != fresh or unexpected:
            raise ConfigError(f"backbone.pretrained: {path} does not fit {arch} (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    if in_channels != 3:  # swap the first conv for one that takes the data's channels
        name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], nn.Conv2d(
            in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
            conv.bias is not None))
    return model


class SDN(MultiExitNet):
    def __init__(self, p: SDNParams, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        model = build_classifier(p.arch, num_classes, in_channels, p.pretrained)
        family = type(model).__name__
        if family not in FAMILIES:
            raise ConfigError(f"backbone.arch: {p.arch} ({family}) cannot be split; supported families: "
                              f"{', '.join(FAMILIES)}")
        trunk, tail = FAMILIES[family]
        groups = split_units([(n, getattr(model, n)) for n in trunk], p.cuts, p.arch)
        self.cuts = list(p.cuts)
        self.stages = nn.ModuleList(
            nn.Sequential(OrderedDict((name.replace(".", "_"), m) for name, m in group)) for group in groups)
        self.num_exits = len(self.stages)

        # Probe the feature shape at every cut to size the heads (eval: BN statistics stay untouched).
        was_training = model.training
        model.eval()
        shapes = []
        with torch.no_grad():
            x = torch.zeros(1, in_channels, image_size, image_size)
            for stage in self.stages[:-1]:
                x = stage(x)
                shapes.append(x.shape)
        model.train(was_training)
        self.heads = nn.ModuleList(make_head(p.head, s, num_classes, p.pool_size) for s in shapes)
        self.heads.append(nn.Sequential(*tail(model)))

    def stage(self, k, state):
        return self.stages[k](state)

    def head(self, k, state):
        return self.heads[k](state)

    def head_embedded(self, k, state):
        out = sequential_head_embedded(self.heads[k], state)
        if out is None:
            raise NotImplementedError(f"exit {k + 1}'s head has no linear layer, hence no embedding")
        return out

    @property
    def has_embeddings(self) -> bool:  # a classifier tail without a Linear (SqueezeNet's conv) has none
        return all(any(isinstance(m, nn.Linear) for m in leaves(h)) for h in self.heads)


@BACKBONES.register("sdn", SDNParams)
def sdn(p: SDNParams, num_classes: int, in_channels: int = 3, image_size: int = 32) -> SDN:
    """Exits on a torchvision CNN or a CIFAR ResNet, cut at named layers (Shallow-Deep Networks)."""
    return SDN(p, num_classes, in_channels, image_size)


BACKBONES.add_preset("sdn-cifar-resnet56", "sdn", doc="SDN's ResNet-56: exits at ~15..90% of the MACs",
                     arch="cifar_resnet56", cuts=["layer1.3", "layer1.7", "layer2.2", "layer2.6", "layer3.1",
                                                  "layer3.5"], head="sdn_pool")
BACKBONES.add_preset("sdn-resnet18", "sdn", doc="ResNet-18, an exit after each of layer1..layer3",
                     arch="resnet18", cuts=["layer1", "layer2", "layer3"], head="sdn_pool")
BACKBONES.add_preset("sdn-resnet50", "sdn", doc="ResNet-50, exits mid-stage and after layer1..layer3 (light heads)",
                     arch="resnet50", cuts=["layer1", "layer2.1", "layer2", "layer3.2", "layer3"],
                     head="pool_linear")


def cut_points(arch: str, in_channels: int = 3) -> list[str]:
    """Every layer name of `arch` that `cuts` may use, in forward order."""
    model = build_classifier(arch, 10, in_channels, pretrained=False)
    family = type(model).__name__
    if family not in FAMILIES:
        raise ConfigError(f"backbone.arch: {arch} ({family}) cannot be split; supported families: "
                          f"{', '.join(FAMILIES)}")
    return cut_names([(n, getattr(model, n)) for n in FAMILIES[family][0]])


def cli_list_cuts(args) -> int:
    """`exitbench flops BACKBONE [arch=...] --list-cuts`: the valid cut points, the configured ones marked."""
    import json

    from bench.config import parse_overrides
    from bench.errors import UsageError
    from bench.registry import load_all

    load_all()
    if BACKBONES.get(args.backbone).factory is not sdn:
        raise UsageError(f"--list-cuts: {args.backbone} has fixed exits; only sdn backbones (sdn, "
                         f"{', '.join(BACKBONES.presets('sdn'))}) are cut at named layers and vit backbones (vit, "
                         f"{', '.join(BACKBONES.presets('vit'))}) after encoder blocks")
    values = {key.removeprefix("backbone."): value for key, value in parse_overrides(args.options)}
    params = BACKBONES.params(args.backbone, values)
    valid = cut_points(params.arch, args.in_channels)
    if args.json:
        print(json.dumps({"backbone": args.backbone, "arch": params.arch, "cuts": params.cuts, "valid": valid},
                         indent=2))
        return 0
    print(f"{args.backbone} ({params.arch}): {len(valid)} cut points in forward order; * = in cuts (an exit "
          f"after that layer); set with cuts=[a,b,...]")
    for name in valid:
        print(f"  {'*' if name in params.cuts else ' '} {name}")
    return 0
