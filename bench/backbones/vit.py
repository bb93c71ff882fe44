"""`vit`: exits on a torchvision VisionTransformer (ViT, Dosovitskiy et al. 2021), after chosen encoder blocks.

The network is torchvision's own `VisionTransformer` (any size its builders make: `arch` vit_b_16, vit_b_32,
vit_l_16, vit_l_32, vit_h_14; or `arch: custom` with patch_size, num_layers, num_heads, hidden_dim and mlp_dim,
torchvision's names), split without changing a module: the stem is the patch embedding (conv_proj, class
token, position embedding, dropout, computed as torchvision's forward does), stage k runs the encoder blocks
after cut k-1 up to and including cut k (`cuts`: 0-based block indices or torchvision's names
`encoder_layer_i`), and the final exit is the model's own head (`encoder.ln` over the sequence, the class
token, `heads`), so the last exit equals torchvision's model output.

Exit heads read the class token of the block's output. `head: ln_linear` (default): a LayerNorm (eps 1e-6,
torchvision's) then a Linear, i.e. the final head's form, since a pre-norm transformer's residual stream is
not normalised between blocks. `head: linear`: the class token straight into a Linear, which is the head the
references put on ViT-B/16: gmum/Zero-Time-Waste `ztw_cv/architectures/early_exits/heads.py`
(`vit_standard_head`, `ViTStandardHead`: `x[:, 0]` then `nn.Linear`; scripts/ztw_vit.py places exits after
blocks [1..10] of 12, our `vit-b-16` preset) and kamadforge/early-exit-benchmark (the same head,
`place_at` [3, 5, 7, 9] in its CIFAR-100 fine-tuning script). `head_hidden: H` adds a hidden Linear + GELU
before the last Linear (ZTW's `vit_2l_head` is H = 1024, without the LayerNorm).

Cost: torchvision's blocks run nn.MultiheadAttention, whose attention products (QK^T, AV) neither fvcore nor
torch's counter count on their own (in eval mode the in/out projections too: the fused
`_native_multi_head_attention`); bench/flops.py registers handles for those operators, so per-exit MACs
include them (4 N D^2 + 2 N^2 D + 2 N D D_mlp per block, N tokens with the class token; fvcore adds the
LayerNorms at 5 per element).

Attention kernels: inference (eval mode, no gradients: evaluation, `exitbench latency`, cost counting) runs
PyTorch's fused kernels (nn.MultiheadAttention's fast path). Training runs the math SDPA kernel by default
(`train_attention: math`), the one PyTorch differentiates twice and in forward mode, which l2w's `exact` and
`jvp` meta-gradients need (the fused CPU/GPU kernels have neither); `train_attention: fused` lets PyTorch pick
its fused kernels in training too (flash or memory-efficient attention on GPUs: less memory; their speed-up is
not measured here), for every strategy but those. Both compute the same function.

`pretrained: true` loads torchvision's ImageNet weights for `arch` from the local torch hub cache only
($TORCH_HOME/hub/checkpoints), nothing is downloaded; the position embedding is resized (bicubic, as
torchvision's `interpolate_embeddings`) to the data's patch grid; with another class count the final Linear,
with in_channels other than 3 the patch projection keep their fresh initialisation. `init` loads a
torchvision ViT state dict from any file (bench/backbones/checkpoint.py renames its keys to ours and
`adapt_state` resizes the position embedding); the exit heads stay fresh.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import nullcontext
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from bench.backbones.checkpoint import read_local_weights
from bench.backbones.contract import MultiExitNet, sequential_head_embedded
from bench.errors import ConfigError, UsageError
from bench.registry import BACKBONES, Params

SIZES = ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")
# arch -> SIZES, as torchvision.models.vision_transformer's builders pass them to VisionTransformer
TORCHVISION = {
    "vit_b_16": (16, 12, 12, 768, 3072),
    "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096),
    "vit_l_32": (32, 24, 16, 1024, 4096),
    "vit_h_14": (14, 32, 16, 1280, 5120),
}
CUSTOM = (4, 6, 4, 64, 128)  # arch=custom's sizes where unset: the vit-mini preset
LN_EPS = 1e-6  # torchvision's ViT LayerNorms


class ViTParams(Params):
    arch: str = Field("custom", description="torchvision ViT (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14) or "
                                            "custom (the sizes below)")
    patch_size: int | None = Field(None, ge=1, description="custom: patch side (unset: 4); a torchvision arch fixes it")
    num_layers: int | None = Field(None, ge=1, description="custom: encoder blocks (unset: 6)")
    num_heads: int | None = Field(None, ge=1, description="custom: attention heads (unset: 4)")
    hidden_dim: int | None = Field(None, ge=1, description="custom: token width D (unset: 64)")
    mlp_dim: int | None = Field(None, ge=1, description="custom: MLP width (unset: 128)")
    cuts: list[int | str] | None = Field(None, min_length=1,
                                         description="blocks after which an exit is placed, in forward order: "
                                                     "0-based indices or names encoder_layer_i (unset: every "
                                                     "block but the last)")
    head: Literal["ln_linear", "linear"] = Field("ln_linear", description="exit head on the class token: LayerNorm + "
                                                 "Linear, or Linear alone (ZTW's vit_standard_head)")
    head_hidden: int = Field(0, ge=0, description="hidden units (GELU) in each exit head (0: none)")
    dropout: float = Field(0.0, ge=0, lt=1)
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    train_attention: Literal["math", "fused"] = Field(
        "math", description="attention kernel in training: math (PyTorch's composite one, differentiable twice and "
                            "in forward mode, as l2w's meta-gradients need) or fused (PyTorch's pick, e.g. flash "
                            "attention on GPUs; l2w's exact and jvp meta-gradients then fail)")
    pretrained: bool = Field(False, description="torchvision ImageNet weights, from the local torch hub cache only")

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        if v != "custom" and v not in TORCHVISION:
            raise ValueError(f"unknown arch; valid: custom, {', '.join(TORCHVISION)}")
        return v

    def sizes(self) -> dict[str, int]:
        """patch_size, num_layers, num_heads, hidden_dim, mlp_dim of this ViT."""
        if self.arch == "custom":
            return {k: getattr(self, k) if getattr(self, k) is not None else d for k, d in zip(SIZES, CUSTOM)}
        own = dict(zip(SIZES, TORCHVISION[self.arch]))
        for key, value in own.items():
            if getattr(self, key) not in (None, value):
                raise ConfigError(f"backbone.{key}: {self.arch} has {key} {value}, got {getattr(self, key)}; leave it "
                                  f"unset or set arch=custom")
        return own

    def default_input(self) -> tuple[int, int]:
        """(image size, classes) for `exitbench flops` without --image-size / --num-classes."""
        return (224, 1000) if self.arch in TORCHVISION else (32, 10)


def cut_indices(cuts: list[int | str] | None, num_layers: int, arch: str) -> list[int]:
    """The 0-based blocks after which the exits sit (every block but the last when `cuts` is None)."""
    if num_layers < 2:
        raise ConfigError(f"backbone.num_layers: {arch} has 1 block, so no exit before the final one; use "
                          f"num_layers >= 2")
    if cuts is None:
        return list(range(num_layers - 1))
    valid = cut_names(num_layers)
    out = []
    for cut in cuts:
        text = str(cut).strip()
        index = int(text) if text.isdigit() else valid.index(text) if text in valid else None
        if index is None or index >= num_layers - 1:
            raise ConfigError(f"backbone.cuts: {cut!r} is not a block of {arch} ({num_layers} blocks) that can be "
                              f"cut (the final exit follows block {num_layers - 1}); valid: 0..{num_layers - 2} or "
                              f"{valid[0]}..{valid[-1]}")
        out.append(index)
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ConfigError(f"backbone.cuts: must be distinct blocks in forward order, got {list(cuts)}")
    return out


def cut_names(num_layers: int) -> list[str]:
    """torchvision's names of the blocks a cut may follow (all but the last), in forward order."""
    return [f"encoder_layer_{i}" for i in range(num_layers - 1)]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# modules -----------------------------------------------------
class ClassToken(nn.Module):
    """The class token of a [N, 1 + patches, D] sequence: what a ViT classifier reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class PatchEmbedding(nn.Module):
    """The stem: patches projected (conv_proj), the class token prepended, the position embedding added, dropout;
    torchvision's VisionTransformer._process_input and Encoder.forward up to the blocks, op for op."""

    def __init__(self, conv_proj: nn.Module, class_token: nn.Parameter, pos_embedding: nn.Parameter,
                 dropout: nn.Module, hidden_dim: int):
        super().__init__()
        self.conv_proj, self.class_token, self.pos_embedding, self.dropout = conv_proj, class_token, pos_embedding, \
            dropout
        self.hidden_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


def make_exit_head(kind: str, hidden_dim: int, num_classes: int, hidden: int) -> nn.Sequential:
    layers: list[nn.Module] = [ClassToken()]
    if kind == "ln_linear":
        layers.append(nn.LayerNorm(hidden_dim, eps=LN_EPS))
    if hidden:
        layers += [nn.Linear(hidden_dim, hidden), nn.GELU()]
    layers.append(nn.Linear(hidden or hidden_dim, num_classes))
    return nn.Sequential(*layers)


def patch_projection(in_channels: int, hidden_dim: int, patch_size: int) -> nn.Conv2d:
    """A fresh conv_proj for other input channels, initialised as torchvision's VisionTransformer does."""
    conv = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
    nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / (in_channels * patch_size * patch_size)))
    nn.init.zeros_(conv.bias)
    return conv


def resize_pos_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """A [1, 1 + g*g, D] position embedding resized to a grid x grid patch grid (torchvision's
    interpolate_embeddings: bicubic over the grid, the class token's row kept)."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    if pos.dim() != 3 or pos.shape[0] != 1 or math.isqrt(pos.shape[1] - 1) ** 2 != pos.shape[1] - 1:
        raise UsageError(f"position embedding of shape {list(pos.shape)} is not a ViT's [1, 1 + g*g, D]")
    if pos.shape[1] == grid * grid + 1:
        return pos
    return interpolate_embeddings(grid, 1, OrderedDict({"encoder.pos_embedding": pos}))["encoder.pos_embedding"]


# model -------------------------------------------------------
class ViT(MultiExitNet):
    def __init__(self, p: ViTParams, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer  # ~1 s to import: only when built

        s = p.sizes()
        patch, layers, heads, width = s["patch_size"], s["num_layers"], s["num_heads"], s["hidden_dim"]
        if image_size % patch:
            fix = ("choose a patch_size" if p.arch == "custom" else
                   f"resize the data to a multiple of {patch} or use arch=custom with a patch_size")
            raise ConfigError(f"backbone.patch_size: {patch}x{patch} patches do not tile {image_size}x{image_size} "
                              f"images ({image_size} % {patch} = {image_size % patch}); {fix} dividing {image_size}: "
                              f"{', '.join(map(str, divisors(image_size)))}")
        if width % heads:
            raise ConfigError(f"backbone.num_heads: {heads} heads do not divide hidden_dim {width}; valid: "
                              f"{', '.join(map(str, divisors(width)))}")
        self.cuts = cut_indices(p.cuts, layers, p.arch)
        self.arch, self.image_size, self.patch_size = p.arch, image_size, patch
        self.train_attention = p.train_attention
        vit = VisionTransformer(image_size=image_size, patch_size=patch, num_layers=layers, num_heads=heads,
                                hidden_dim=width, mlp_dim=s["mlp_dim"], dropout=p.dropout,
                                attention_dropout=p.attention_dropout, num_classes=num_classes)
        if p.pretrained:
            load_pretrained(vit, p.arch, image_size, patch)
        if in_channels != 3:
            vit.conv_proj = patch_projection(in_channels, width, patch)
        self.embed = PatchEmbedding(vit.conv_proj, vit.class_token, vit.encoder.pos_embedding, vit.encoder.dropout,
                                    width)
        self.blocks = nn.ModuleList(vit.encoder.layers)  # encoder_layer_i -> blocks.i
        self.exits = nn.ModuleList(make_exit_head(p.head, width, num_classes, p.head_hidden) for _ in self.cuts)
        self.final = nn.Sequential(OrderedDict([("ln", vit.encoder.ln), ("token", ClassToken()),
                                                *vit.heads.named_children()]))
        self.bounds = [0, *(c + 1 for c in self.cuts), layers]  # stage k runs blocks bounds[k]:bounds[k+1]
        self.num_exits = len(self.cuts) + 1

    def stem(self, x):
        return self.embed(x)

    def stage(self, k, state):
        with self.attention_kernels():
            for block in self.blocks[self.bounds[k]:self.bounds[k + 1]]:
                state = block(state)
        return state

    def attention_kernels(self):
        """The math attention kernel while training (train mode or autograd recording) unless train_attention is
        fused; inference (eval mode, no gradients) runs PyTorch's fused kernels, e.g. nn.MultiheadAttention's
        fast path."""
        if self.train_attention == "math" and (self.training or torch.is_grad_enabled()):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel(SDPBackend.MATH)
        return nullcontext()

    def head(self, k, state):
        return self.final(state) if k == self.num_exits - 1 else self.exits[k](state)

    def head_embedded(self, k, state):
        return sequential_head_embedded(self.final if k == self.num_exits - 1 else self.exits[k], state)

    def head_module(self, k):
        return self.final if k == self.num_exits - 1 else self.exits[k]

    def adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict in our key names with its position embedding resized to this model's patch grid (a
        torchvision ViT's weights at another image size); bench.backbones.checkpoint calls it before loading."""
        pos = state.get("embed.pos_embedding")
        own = self.embed.pos_embedding
        if pos is None or pos.shape == own.shape or pos.dim() != 3 or pos.shape[2] != own.shape[2]:
            return state  # absent or not resizable: the strict check names it
        return {**state, "embed.pos_embedding": resize_pos_embedding(pos, self.image_size // self.patch_size)}


@BACKBONES.register("vit", ViTParams)
def vit(p: ViTParams, num_classes: int, in_channels: int = 3, image_size: int = 32) -> ViT:
    """Exits on a torchvision Vision Transformer, after chosen encoder blocks (class-token heads)."""
    return ViT(p, num_classes, in_channels, image_size)


BACKBONES.add_preset("vit-mini", "vit", doc="a small ViT for 28x28 / 32x32 images on a CPU: patch 4, 6 blocks of "
                     "width 64, an exit after each block", arch="custom", patch_size=4, num_layers=6, num_heads=4,
                     hidden_dim=64, mlp_dim=128, cuts=[0, 1, 2, 3, 4])
BACKBONES.add_preset("vit-b-16", "vit", doc="ViT-B/16 (224x224), exits after blocks 1..10 of 0..11 (ZTW's place_at)",
                     arch="vit_b_16", cuts=list(range(1, 11)))
BACKBONES.add_preset("vit-b-32", "vit", doc="ViT-B/32 (224x224), exits after blocks 1..10 of 0..11",
                     arch="vit_b_32", cuts=list(range(1, 11)))
BACKBONES.add_preset("vit-l-16", "vit", doc="ViT-L/16 (224x224), exits after every other block 1, 3, .., 21 of 0..23",
                     arch="vit_l_16", cuts=list(range(1, 23, 2)))


# pretrained weights ------------------------------------------
def load_pretrained(model: nn.Module, arch: str, image_size: int, patch_size: int) -> None:
    """torchvision's weights for `arch` from the hub cache into torchvision's `model` (before it is split)."""
    if arch == "custom":
        raise ConfigError("backbone.pretrained: arch=custom has no pretrained weights; name a torchvision arch "
                          f"({', '.join(TORCHVISION)}) or set pretrained=false")
    path, state = read_local_weights(arch)
    if "encoder.pos_embedding" not in state:
        raise ConfigError(f"backbone.pretrained: {path} does not hold a torchvision ViT state dict; remove it and "
                          f"put {arch}'s torchvision weights there, or set pretrained=false")
    state = dict(state)
    try:
        state["encoder.pos_embedding"] = resize_pos_embedding(state["encoder.pos_embedding"], image_size // patch_size)
    except UsageError as err:
        raise ConfigError(f"backbone.pretrained: {path}: {err}") from None
    own = model.state_dict()
    fresh = {k for k, v in state.items() if k in own and v.shape != own[k].shape}  # another class count's classifier
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    if set(missing) != fresh or unexpected or not fresh <= {"heads.head.weight", "heads.head.bias"}:
        raise ConfigError(f"backbone.pretrained: {path} does not fit {arch} (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}, other shapes {sorted(fresh)[:3]})")


def cli_list_cuts(args) -> int:
    """`exitbench flops vit... --list-cuts`: the blocks an exit may follow, the configured ones marked."""
    import json

    from bench.config import parse_overrides

    values = {key.removeprefix("backbone."): value for key, value in parse_overrides(args.options)}
    params = BACKBONES.params(args.backbone, values)
    layers = params.sizes()["num_layers"]
    cuts = cut_indices(params.cuts, layers, params.arch)
    names = cut_names(layers)
    if args.json:
        print(json.dumps({"backbone": args.backbone, "arch": params.arch, "num_layers": layers,
                          "cuts": [names[c] for c in cuts], "valid": names}, indent=2))
        return 0
    print(f"{args.backbone} ({params.arch}, {layers} blocks): {len(names)} cut points in forward order (the final "
          f"exit follows block {layers - 1}); * = in cuts; set with cuts=[i,j,...] or names")
    for i, name in enumerate(names):
        print(f"  {'*' if i in cuts else ' '} {i:>2}  {name}")
    return 0
