"""MSDNet (Huang et al., ICLR 2018), built as kalviny/MSDNet-PyTorch builds it (copied into L2W-DEN).

A dense network on `len(grFactor)` scales. Every layer adds `growthRate * grFactor[s]` channels at each
scale s: the finest scale by a conv on itself, each coarser scale by a strided conv on the next finer scale
plus a conv on itself. Coarse scales are dropped as depth grows (`prune`), each drop followed by a 1x1
transition that compresses the channels by `reduction`. Block k holds `steps[k]` layers; exit k's
classifier reads only the coarsest scale after block k.

Module names mirror the reference's state_dict keys exactly (`blocks.{k}.{i}...`, `classifier.{k}.m...`,
`classifier.{k}.linear`), so a reference checkpoint loads with no key translation
(`bench.backbones.checkpoint.load_reference_checkpoint`). The stem lives inside block 0, as there.

Two deliberate differences, neither visible in a checkpoint nor in the reference geometry:
- Heads pool with AdaptiveAvgPool2d(1) where the reference has AvgPool2d(2); both average the 2x2 map
  the reference sizes produce, but ours also runs on other input sizes.
- Input channels are a parameter (the reference hard-codes 3).
Initialisation is PyTorch's default, as in the reference: its `_init_weights` only visits the direct
children of each block (containers, not convs), so it never changes a weight.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from bench.backbones.contract import MultiExitNet
from bench.errors import ConfigError
from bench.registry import BACKBONES, Params, dashed_ints

Factor = Annotated[int, Field(ge=1)]


class MSDNetParams(Params):
    """Reference flag names. Defaults: the L2W-DEN CIFAR configuration (= msdnet-cifar-budget)."""

    data: Literal["auto", "cifar", "imagenet"] = Field(
        "auto", description="stem and heads: cifar (3x3 stem, 128-wide heads) or imagenet (7x7/2 stem + "
                            "max-pool, heads as wide as their input); auto: imagenet if image_size >= 128")
    nBlocks: int = Field(5, ge=1, description="blocks = exits")
    stepmode: Literal["even", "lin_grow"] = "lin_grow"
    step: int = Field(1, ge=1, description="layers per block after the first (even: step; lin_grow: step*k+1)")
    base: int = Field(1, ge=1, description="layers in the first block")
    nChannels: int = Field(16, ge=1, description="stem channels at the finest scale (times grFactor per scale)")
    grFactor: list[Factor] = Field(default_factory=lambda: [1, 2, 4], min_length=1,
                                   description="per-scale growth factor; its length is the number of scales")
    bnFactor: list[Factor] = Field(default_factory=lambda: [1, 2, 4], min_length=1,
                                   description="per-scale bottleneck width factor")
    growthRate: int = Field(6, ge=1)
    prune: Literal["max", "min"] = "max"
    reduction: float = Field(0.5, ge=0, le=1, description="transition compression (0: no transitions)")
    bottleneck: bool = True

    @field_validator("grFactor", "bnFactor", mode="before")
    @classmethod
    def _dashed(cls, v):
        return dashed_ints(v)

    @field_validator("bnFactor")
    @classmethod
    def _one_per_scale(cls, v: list[int], info: ValidationInfo) -> list[int]:
        gr = info.data.get("grFactor")
        if gr is not None and len(v) != len(gr):
            raise ValueError(f"needs one entry per scale, as many as grFactor {gr} ({len(gr)})")
        return v

    @field_validator("growthRate")
    @classmethod
    def _even_halves(cls, v: int, info: ValidationInfo) -> int:
        # Coarser scales grow by two halves (strided + same-scale conv) of growthRate*grFactor[s] channels.
        gr = info.data.get("grFactor") or []
        odd = [f for f in gr[1:] if (v * f) % 2]
        if odd:
            raise ValueError(f"growthRate*grFactor[s] must be even for every scale s >= 1 (grFactor {gr})")
        return v

    def steps(self) -> list[int]:
        """Layers per block: [base, then step (even) or step*k+1 (lin_grow) for k = 1..nBlocks-1]."""
        grow = [self.step if self.stepmode == "even" else self.step * k + 1 for k in range(1, self.nBlocks)]
        return [self.base, *grow]


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> nn.Module:
    return _Wrapped(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True))


class _Wrapped(nn.Module):
    """A Sequential kept under `.net` (the reference's ConvBasic / ConvBN key layout)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def dense_conv(c_in: int, c_out: int, stride: int, bottleneck: bool, bn_width: int) -> nn.Module:
    """[1x1 to min(c_in, bn_width*c_out) -> BN -> ReLU ->] 3x3 (stride 1 or 2) -> BN -> ReLU."""
    layers: list[nn.Module] = []
    inner = c_in
    if bottleneck:
        inner = min(c_in, bn_width * c_out)
        layers += [nn.Conv2d(c_in, inner, 1, 1, 0, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True)]
    layers += [nn.Conv2d(inner, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return _Wrapped(*layers)


class SameScale(nn.Module):
    """Finest kept scale: concat(x, conv(x))."""

    def __init__(self, c_in: int, c_new: int, bottleneck: bool, bn_width: int):
        super().__init__()
        self.conv_normal = dense_conv(c_in, c_new, 1, bottleneck, bn_width)

    def forward(self, finer, same):
        return torch.cat([same, self.conv_normal(same)], dim=1)


class FromFinerScale(nn.Module):
    """Coarser scale: concat(x, strided conv(finer), conv(x)), each conv giving half the new channels."""

    def __init__(self, c_finer: int, c_same: int, c_new: int, bottleneck: bool, bn_finer: int, bn_same: int):
        super().__init__()
        self.conv_down = dense_conv(c_finer, c_new // 2, 2, bottleneck, bn_finer)
        self.conv_normal = dense_conv(c_same, c_new // 2, 1, bottleneck, bn_same)

    def forward(self, finer, same):
        return torch.cat([same, self.conv_down(finer), self.conv_normal(same)], dim=1)


class FirstLayer(nn.Module):
    """Stem: the finest scale from the image, each coarser one by a strided conv on the previous."""

    def __init__(self, in_channels: int, width: int, gr: list[int], data: str):
        super().__init__()
        c = width * gr[0]
        if data == "imagenet":  # conv 7x7/2 with bias, BN, ReLU, max-pool 3/2: 224 -> 56
            first = nn.Sequential(nn.Conv2d(in_channels, c, 7, 2, 3), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        else:
            first = conv_bn_relu(in_channels, c, 3, 1, 1)
        self.layers = nn.ModuleList([first])
        for s in range(1, len(gr)):
            self.layers.append(conv_bn_relu(width * gr[s - 1], width * gr[s], 3, 2, 1))

    def forward(self, x):
        scales = []
        for layer in self.layers:
            x = layer(x)
            scales.append(x)
        return scales


class MSDLayer(nn.Module):
    """One dense layer over the kept scales. It takes `in_scales` maps and returns the coarsest
    `out_scales` (one fewer when the finest is dropped here; that one still feeds the strided path)."""

    def __init__(self, c_in: int, growth: int, gr: list[int], bn: list[int], bottleneck: bool,
                 in_scales: int, out_scales: int):
        super().__init__()
        first = len(gr) - out_scales  # index of the finest scale this layer outputs
        self.drops = in_scales > out_scales
        self.layers = nn.ModuleList()
        for s in range(first, len(gr)):
            if s == first and not self.drops:
                self.layers.append(SameScale(c_in * gr[s], growth * gr[s], bottleneck, bn[s]))
            else:
                self.layers.append(FromFinerScale(c_in * gr[s - 1], c_in * gr[s], growth * gr[s], bottleneck,
                                                  bn[s - 1], bn[s]))

    def forward(self, x: list) -> list:
        shift = int(self.drops)  # input i + shift is output i's own scale
        return [layer(x[i + shift - 1] if i + shift else None, x[i + shift]) for i, layer in enumerate(self.layers)]


class Transition(nn.Module):
    """Per-scale 1x1 conv-BN-ReLU compressing the channels (the reference's ParallelModule of ConvBasic)."""

    def __init__(self, c_in: int, c_out: int, factors: list[int]):
        super().__init__()
        self.m = nn.ModuleList(conv_bn_relu(c_in * f, c_out * f, 1, 1, 0) for f in factors)

    def forward(self, x: list) -> list:
        return [conv(t) for conv, t in zip(self.m, x)]


class Classifier(nn.Module):
    """Exit head on the coarsest scale: two conv-BN-ReLU 3x3/2, global average pool, linear."""

    def __init__(self, c_in: int, hidden: int, num_classes: int):
        super().__init__()
        self.m = nn.Sequential(conv_bn_relu(c_in, hidden, 3, 2, 1), conv_bn_relu(hidden, hidden, 3, 2, 1),
                               nn.AdaptiveAvgPool2d(1))
        self.linear = nn.Linear(hidden, num_classes)

    def forward(self, x: list) -> torch.Tensor:
        return self.linear(self.embed(x))

    def embed(self, x: list) -> torch.Tensor:
        return self.m(x[-1]).flatten(1)


def scales_at(p: MSDNetParams, layer: int, n_layers: int) -> tuple[int, int]:
    """(input scales, output scales) of 1-based layer `layer` of `n_layers` under the prune rule."""
    n = len(p.grFactor)
    if p.prune == "min":  # drop a scale per layer over the last n-1 layers
        return min(n, n_layers - layer + 2), min(n, n_layers - layer + 1)
    interval = math.ceil(n_layers / n)  # max: drop a scale every `interval` layers
    return n - max(0, layer - 2) // interval, n - (layer - 1) // interval


class MSDNet(MultiExitNet):
    def __init__(self, p: MSDNetParams, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.data = p.data if p.data != "auto" else ("imagenet" if image_size >= 128 else "cifar")
        self.steps = p.steps()
        self.num_exits = p.nBlocks
        gr, n_layers = p.grFactor, sum(self.steps)
        self.blocks = nn.ModuleList()
        self.classifier = nn.ModuleList()
        width, layer = p.nChannels, 0  # width: channels per unit of grFactor
        for n_block_layers in self.steps:
            layers: list[nn.Module] = [FirstLayer(in_channels, width, gr, self.data)] if layer == 0 else []
            for _ in range(n_block_layers):
                layer += 1
                in_scales, out_scales = scales_at(p, layer, n_layers)
                layers.append(MSDLayer(width, p.growthRate, gr, p.bnFactor, p.bottleneck, in_scales, out_scales))
                width += p.growthRate
                if p.reduction > 0 and (
                    (p.prune == "max" and in_scales > out_scales)
                    or (p.prune == "min" and layer in (math.floor(n_layers / 3), math.floor(2 * n_layers / 3)))
                ):
                    reduced = math.floor(p.reduction * width)
                    if reduced < 1:
                        raise ConfigError(f"backbone.reduction: {p.reduction} leaves no channels at the transition "
                                          f"after layer {layer} ({width} channels); use a larger reduction or 0")
                    layers.append(Transition(width, reduced, gr[len(gr) - out_scales:]))
                    width = reduced
            self.blocks.append(nn.Sequential(*layers))
            c_head = width * gr[-1]
            self.classifier.append(Classifier(c_head, 128 if self.data == "cifar" else c_head, num_classes))

    def stage(self, k, state):
        return self.blocks[k](state)

    def head(self, k, state):
        return self.classifier[k](state)

    def head_embedded(self, k, state):
        embedding = self.classifier[k].embed(state)
        return self.classifier[k].linear(embedding), embedding

    def head_module(self, k):
        return self.classifier[k]


@BACKBONES.register("msdnet", MSDNetParams)
def msdnet(p: MSDNetParams, num_classes: int, in_channels: int = 3, image_size: int = 32) -> MSDNet:
    """MSDNet (multi-scale dense network), as kalviny/MSDNet-PyTorch; reference checkpoints load as they are."""
    return MSDNet(p, num_classes, in_channels, image_size)


def _preset(name: str, doc: str, **values) -> None:
    BACKBONES.add_preset(name, "msdnet", doc=doc, **values)


_CIFAR = dict(data="cifar", nChannels=16, growthRate=6, grFactor=[1, 2, 4], bnFactor=[1, 2, 4])
_preset("msdnet-cifar-anytime", "MSDNet README CIFAR anytime config (7 exits)",
        nBlocks=7, stepmode="even", step=2, base=4, **_CIFAR)
_preset("msdnet-cifar-budget", "MSDNet README CIFAR budgeted config, as in L2W-DEN (5 exits)",
        nBlocks=5, stepmode="lin_grow", step=1, base=1, **_CIFAR)
_preset("msdnet-fmnist", "MSDNet for 28x28 grey (Fashion-MNIST): 3 scales 28/14/7, 5 exits, 2.6-11.3 M MACs",
        nBlocks=5, stepmode="even", step=1, base=1, data="cifar", nChannels=8, growthRate=4, grFactor=[1, 2, 4],
        bnFactor=[1, 2, 4])
for _k in (4, 6, 7):
    _preset(f"msdnet-imagenet-step{_k}", f"MSDNet ImageNet, step = base = {_k} (5 exits)", data="imagenet",
            nBlocks=5, stepmode="even", step=_k, base=_k, nChannels=32, growthRate=16, grFactor=[1, 2, 4, 4],
            bnFactor=[1, 2, 4, 4])
