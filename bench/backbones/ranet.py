"""RANet (Yang et al., CVPR 2020): resolution-adaptive multi-exit network, as yangle15/RANet-pytorch builds it.

Sub-network ii works at resolution level `scale_list[ii]` (1 = coarsest) and has NB[ii+1] dense blocks,
NB = [0, nBlocks, nBlocks + block_step, ...]. Its first NB[ii] blocks are fusion blocks: every layer also
reads the matching layer input of the previous sub-network's block of the same index (a ConvBN with
floor(g * compress_factor) outputs, bilinearly resized). The last `scale_list[ii] - 1` of those fusion
blocks whose index is in NB halve the resolution in their last layer. The remaining blocks are plain dense
blocks, each followed by an exit; exits come sub-network by sub-network, coarsest first. The stem builds
every scale at once, so exit 1 pays for the full-resolution stem (as the reference counts it).

Checked against the reference module by module (channels, strides, bottleneck widths, transitions). Two
deliberate generalisations: a bilinear resize to the size a tensor already has (align_corners=True, an
exact copy) is skipped, and the heads pool adaptively to 1x1 (the reference's AvgPool2d(2) on its 2x2
map; identical there, and other input sizes keep working).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from bench.backbones.contract import MultiExitNet
from bench.errors import ConfigError
from bench.registry import BACKBONES, Params, dashed_ints


class RANetParams(Params):
    data: Literal["auto", "cifar", "imagenet"] = Field(
        "auto", description="stem and heads: cifar (3x3 stem, 128-wide heads) or imagenet (7x7/2 stem + max-pool, "
                            "heads as wide as their input); auto: imagenet if image_size >= 128")
    nBlocks: int = Field(2, ge=1, description="blocks (= exits) of the first, coarsest sub-network")
    block_step: int = Field(2, ge=1, description="extra blocks (= exits) of each further sub-network")
    step: int = Field(4, ge=1, description="layers per block (even) or its increment (lg)")
    stepmode: Literal["even", "lg"] = Field("even", description="even: every block has `step` layers; lg: step*(i+1)")
    scale_list: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1,
                                  description="resolution level of each sub-network, 1 = coarsest")
    nChannels: int = Field(16, ge=1)
    growthRate: int = Field(6, ge=1)
    grFactor: list[int] = Field(default_factory=lambda: [4, 2, 1], min_length=1)
    bnFactor: list[int] = Field(default_factory=lambda: [4, 2, 1], min_length=1)
    compress_factor: float = Field(0.25, gt=0, lt=1, description="share of each layer's growth fed from the "
                                                                  "previous sub-network")
    reduction: float = Field(0.5, gt=0, le=1, description="channel reduction of the transition layers")
    bnAfter: bool = Field(True, description="conv-BN-ReLU (True, the only mode the reference reaches) or "
                                            "pre-activation BN-ReLU-conv ConvBN layers")

    @field_validator("scale_list", "grFactor", "bnFactor", mode="before")
    @classmethod
    def _dashed(cls, v):
        return dashed_ints(v)


def conv_bn_relu(n_in: int, n_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """The reference's ConvBasic."""
    return nn.Sequential(nn.Conv2d(n_in, n_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(n_out), nn.ReLU(inplace=True))


def bottleneck_conv(n_in: int, n_out: int, stride: int, width: int, bn_after: bool) -> nn.Sequential:
    """The reference's ConvBN: 1x1 bottleneck to min(n_in, width*n_out) channels, then a 3x3 conv."""
    inner = min(n_in, width * n_out)
    conv1 = nn.Conv2d(n_in, inner, 1, bias=False)
    conv3 = nn.Conv2d(inner, n_out, 3, stride, 1, bias=False)
    if bn_after:
        return nn.Sequential(conv1, nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
                             conv3, nn.BatchNorm2d(n_out), nn.ReLU(inplace=True))
    return nn.Sequential(nn.BatchNorm2d(n_in), nn.ReLU(inplace=True), conv1,
                         nn.BatchNorm2d(inner), nn.ReLU(inplace=True), conv3)


def resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    # Bilinear with align_corners=True maps a same-size grid onto itself exactly: skip the no-op.
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class DenseLayer(nn.Module):
    """cat(x, ConvBN(x)) -- the reference's ConvNormal."""

    def __init__(self, n_in: int, growth: int, width: int, bn_after: bool):
        super().__init__()
        self.conv = bottleneck_conv(n_in, growth, 1, width, bn_after)

    def forward(self, x):
        return torch.cat([x, self.conv(x)], 1)


class FusionLayer(nn.Module):
    """cat(x, resized ConvBN(low), ConvBN(x)); optionally strided -- the reference's ConvUpNormal."""

    def __init__(self, n_in: int, n_low: int, growth: int, compress: float, width: int, width_low: int,
                 down: bool, bn_after: bool):
        super().__init__()
        n_up = math.floor(growth * compress)
        self.conv_up = bottleneck_conv(n_low, n_up, 1, width_low, bn_after)
        self.conv = bottleneck_conv(n_in, growth - n_up, 2 if down else 1, width, bn_after)

    def forward(self, x, low):
        new = self.conv(x)
        size = new.shape[-2:]
        return torch.cat([resize(x, size), resize(self.conv_up(low), size), new], 1)


class DenseBlock(nn.Module):
    """`layers` dense layers, then an optional 1x1 transition. Returns (output, [input, each layer's output])
    -- the list is what the next sub-network's fusion block of the same index reads."""

    def __init__(self, n_in: int, layers: int, growth: int, width: int, bn_after: bool, transition: int | None):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(n_in + i * growth, growth, width, bn_after) for i in range(layers))
        self.trans = conv_bn_relu(n_in + layers * growth, transition, 1) if transition else None

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return (self.trans(x) if self.trans is not None else x), feats


class FusionBlock(nn.Module):
    """Dense block whose layers also read the previous sub-network (`low` = that block's feature list), plus
    a compressed 1x1 of the previous block's last output before the optional transition."""

    def __init__(self, n_in: int, n_low: list[int], layers: int, growth: int, compress: float, width: int,
                 width_low: int, down: bool, bn_after: bool, transition: int | None):
        super().__init__()
        self.layers = nn.ModuleList(
            FusionLayer(n_in + i * growth, n_low[i], growth, compress, width, width_low,
                        down and i == layers - 1, bn_after)
            for i in range(layers))
        n_out = n_in + layers * growth
        self.conv_last = conv_bn_relu(n_low[layers], math.floor(n_out * compress), 1)
        self.trans = conv_bn_relu(n_out + math.floor(n_out * compress), transition, 1) if transition else None

    def forward(self, x, low):
        feats = [x]
        for layer, low_i in zip(self.layers, low):
            x = layer(x, low_i)
            feats.append(x)
        x = torch.cat([x, resize(self.conv_last(low[-1]), x.shape[-2:])], 1)
        return (self.trans(x) if self.trans is not None else x), feats


class Head(nn.Module):
    """Two strided conv-BN-ReLU, average pool, linear (MSDNet's classifier; CIFAR: 128 channels)."""

    def __init__(self, n_in: int, width: int, num_classes: int):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(n_in, width, 3, 2), conv_bn_relu(width, width, 3, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.linear(self.embed(x))

    def embed(self, x):
        return self.pool(self.convs(x)).flatten(1)


def check(p: RANetParams) -> None:
    """Options the reference would silently mis-build or crash on -> one-line ConfigError."""
    n = len(p.scale_list)
    for name in ("grFactor", "bnFactor"):
        if len(getattr(p, name)) != n:
            raise ConfigError(f"backbone.{name}: needs one entry per scale_list entry ({n}), got {getattr(p, name)}")
    s = p.scale_list
    if s[0] != 1 or any(b - a not in (0, 1) for a, b in zip(s, s[1:])) or any(v < 2 for v in s[1:]):
        raise ConfigError(f"backbone.scale_list: must start at 1 and rise by 0 or 1 per entry, later entries "
                          f">= 2 (e.g. 1-2-3, 1-2-3-3, 1-2-3-4), got {s}")
    for name in ("grFactor", "bnFactor"):
        if min(getattr(p, name)) < 1:
            raise ConfigError(f"backbone.{name}: entries must be >= 1, got {getattr(p, name)}")
    for ii in range(1, n):  # fusion layers split their growth between the previous sub-network and their own
        growth = p.growthRate * p.grFactor[ii]
        if not 1 <= math.floor(growth * p.compress_factor) < growth:
            raise ConfigError(f"backbone.compress_factor: growthRate*grFactor*compress_factor must be >= 1 and "
                              f"< growthRate*grFactor ({growth}), got {p.compress_factor}")
    if math.floor(p.nChannels * min(p.grFactor) * p.reduction) < 1:
        raise ConfigError(f"backbone.reduction: transitions would have 0 channels, got {p.reduction}")


class RANet(MultiExitNet):
    def __init__(self, p: RANetParams, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        check(p)
        self.data = p.data if p.data != "auto" else ("imagenet" if image_size >= 128 else "cifar")
        n_scales = len(p.scale_list)
        nb = [0] + [p.nBlocks + p.block_step * i for i in range(n_scales)]
        layers_of = (lambda i: p.step) if p.stepmode == "even" else (lambda i: p.step * (i + 1))

        # Stem: finest scale first, a stride-2 ConvBasic whenever the scale level changes; stored coarse-first.
        first: list[nn.Module] = []
        c_first = p.nChannels * p.grFactor[-1]
        if self.data == "cifar":
            first.append(conv_bn_relu(in_channels, c_first))
        else:
            first.append(nn.Sequential(nn.Conv2d(in_channels, c_first, 7, 2, 3), nn.BatchNorm2d(c_first),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)))
        for j in range(n_scales - 2, -1, -1):
            stride = 1 if p.scale_list[j] == p.scale_list[j + 1] else 2
            first.append(conv_bn_relu(p.nChannels * p.grFactor[j + 1], p.nChannels * p.grFactor[j], 3, stride))
        self.first = nn.ModuleList(first)

        self.flows = nn.ModuleList()
        self.heads = nn.ModuleList()
        self.plan: list[tuple[int, list[int]]] = []  # exit k -> (sub-network, blocks to run)
        low_channels: list[list[int]] = []
        for ii in range(n_scales):
            growth = p.growthRate * p.grFactor[ii]
            n_in = p.nChannels * p.grFactor[ii]
            scale = p.scale_list[ii]
            downs = set(nb[: ii + 1][-(scale - 1):]) if scale > 1 else set()
            transitions = {math.floor((j + 1) * nb[ii + 1] / scale) for j in range(scale - 1)}
            flow, channels, pending = nn.ModuleList(), [], []
            for i in range(nb[ii + 1]):
                layers = layers_of(i)
                n_out = n_in + layers * growth
                fusion = i < nb[ii]
                if fusion:
                    n_out += math.floor(n_out * p.compress_factor)
                trans = math.floor(p.reduction * n_out) if (i + 1) in transitions else None
                if fusion:
                    block = FusionBlock(n_in, low_channels[i], layers, growth, p.compress_factor, p.bnFactor[ii],
                                        p.bnFactor[ii - 1], (i + 1) in downs, p.bnAfter, trans)
                else:
                    block = DenseBlock(n_in, layers, growth, p.bnFactor[ii], p.bnAfter, trans)
                flow.append(block)
                channels.append([n_in + j * growth for j in range(layers + 1)])
                n_in = trans or n_out
                pending.append(i)
                if not fusion:  # every plain block ends in an exit
                    width = 128 if self.data == "cifar" else n_in
                    self.heads.append(Head(n_in, width, num_classes))
                    self.plan.append((ii, pending))
                    pending = []
            self.flows.append(flow)
            low_channels = channels
        self.num_exits = len(self.heads)
        self._fusion_blocks = nb[:-1]

        # The reference initialises blocks and heads (not the stem) this way.
        for m in [*self.flows.modules(), *self.heads.modules()]:
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def stem(self, x):
        scales = []
        for layer in self.first:
            x = layer(x)
            scales.append(x)
        return {"inputs": scales[::-1], "x": None, "feats": []}  # coarsest first, one per sub-network

    def stage(self, k, state):
        ii, blocks = self.plan[k]
        inputs, x, feats = state["inputs"], state["x"], state["feats"]
        low = None
        if blocks[0] == 0:  # a new sub-network starts from its stem scale and reads the previous one's blocks
            x, inputs, low, feats = inputs[0], inputs[1:], feats, []
        feats = list(feats)
        for i in blocks:
            block = self.flows[ii][i]
            x, block_feats = block(x, low[i]) if i < self._fusion_blocks[ii] else block(x)
            feats.append(block_feats)
        return {"inputs": inputs, "x": x, "feats": feats}

    def head(self, k, state):
        return self.heads[k](state["x"])

    def head_embedded(self, k, state):
        embedding = self.heads[k].embed(state["x"])
        return self.heads[k].linear(embedding), embedding


@BACKBONES.register("ranet", RANetParams)
def ranet(p: RANetParams, num_classes: int, in_channels: int = 3, image_size: int = 32) -> RANet:
    """RANet (yangle15/RANet-pytorch): sub-networks from coarse to fine resolution, two exits each."""
    return RANet(p, num_classes, in_channels, image_size)


BACKBONES.add_preset("ranet-cifar", "ranet", doc="README CIFAR: lg steps, 6 exits", data="cifar", step=2,
                     stepmode="lg", scale_list=[1, 2, 3], grFactor=[4, 2, 1], bnFactor=[4, 2, 1], nChannels=16,
                     growthRate=6)
BACKBONES.add_preset("ranet-cifar-sh", "ranet", doc="train_cifar.sh: 8 exits", data="cifar", step=4,
                     stepmode="even", scale_list=[1, 2, 3, 3], grFactor=[4, 2, 1, 1], bnFactor=[4, 2, 1, 1],
                     nChannels=16, growthRate=6)
BACKBONES.add_preset("ranet-imagenet", "ranet", doc="README ImageNet: 8 exits", data="imagenet", step=8,
                     stepmode="even", scale_list=[1, 2, 3, 4], grFactor=[4, 2, 2, 1], bnFactor=[4, 2, 2, 1],
                     nChannels=32, growthRate=16)
