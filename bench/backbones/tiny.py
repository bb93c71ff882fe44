"""A tiny multi-exit CNN (4 exits, ~0.1 M params) for tests and the CPU default sweep."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from bench.backbones.contract import MultiExitNet, sequential_head_embedded
from bench.registry import BACKBONES, Params


class TinyParams(Params):
    widths: list[int] = Field(default_factory=lambda: [16, 32, 48, 64], min_length=1, max_length=8)
    head_hidden: int = Field(0, ge=0, description="hidden units in each exit head (0: linear head)")


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TinyNet(MultiExitNet):
    def __init__(self, p: TinyParams, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.num_exits = len(p.widths)
        chans = [in_channels, *p.widths]
        # Downsample at every stage but the first while the feature map stays >= 2x2.
        self.stages = nn.ModuleList()
        size = image_size
        for k in range(self.num_exits):
            stride = 2 if (k > 0 and size >= 4) else 1
            size = (size + stride - 1) // stride
            self.stages.append(nn.Sequential(_conv_bn_relu(chans[k], chans[k + 1], stride),
                                             _conv_bn_relu(chans[k + 1], chans[k + 1], 1)))
        self.heads = nn.ModuleList()
        for w in p.widths:
            layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            if p.head_hidden:
                layers += [nn.Linear(w, p.head_hidden), nn.ReLU(inplace=True), nn.Linear(p.head_hidden, num_classes)]
            else:
                layers += [nn.Linear(w, num_classes)]
            self.heads.append(nn.Sequential(*layers))

    def stage(self, k, state):
        return self.stages[k](state)

    def head(self, k, state):
        return self.heads[k](state)

    def head_embedded(self, k, state):
        return sequential_head_embedded(self.heads[k], state)


@BACKBONES.register("tiny", TinyParams)
def tiny(p: TinyParams, num_classes: int, in_channels: int = 3, image_size: int = 32) -> TinyNet:
    """Tiny multi-exit CNN: one conv-bn-relu pair per stage, a pooled linear head per exit."""
    return TinyNet(p, num_classes, in_channels, image_size)
