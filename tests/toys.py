"""Toy multi-exit networks the strategy tests share (their math is written out in the tests)."""

import torch
from torch import nn

from bench.backbones.contract import MultiExitNet


class ChainNet(MultiExitNet):
    """K linear stages (tanh) on a vector state of width d, a linear head per stage; float64, no BatchNorm."""

    def __init__(self, K=3, d=4, classes=3):
        super().__init__()
        self.num_exits = K
        self.stages = nn.ModuleList(nn.Linear(d, d) for _ in range(K))
        self.heads = nn.ModuleList(nn.Linear(d, classes) for _ in range(K))
        self.double()

    def stage(self, k, state):
        return torch.tanh(self.stages[k](state))

    def head(self, k, state):
        return self.heads[k](state)
