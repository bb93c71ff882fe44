"""Load weights into our models: exitbench checkpoints and the reference projects' files, detected by content.

Formats (after unwrapping a `state_dict` / `model_state_dict` / `model` entry and any DataParallel/DDP
`module.` prefix):
- exitbench: a trial checkpoint `{config, model, strategy, ...}` (the l2w WPN is `strategy.wpn`), or a bare
  `model.state_dict()`.
- kalviny/MSDNet-PyTorch, LeapLabTHU/L2W-DEN and kalviny/IMTA stage 1 (`msdnet_ge`): our MSDNet mirrors their
  module names, so keys load as they are. L2W-DEN checkpoints also carry the WPN (`meta_state_dict`, an
  `MLP_tanh`: `first_hidden_layer.fc`, `rest_hidden_layers.i.fc`, `output_layer`), renamed to our
  WeightPredictor's `net.0`, `net.2`, ...
- yangle15/RANet-pytorch (`FirstLayer.*`, `scale_flows.*`, `classifier.*`): renamed to our RANet's
  (`first.*`, `flows.*`, `heads.*`; their `ConvBasic`/`ConvBN` `.net` wrappers dropped).
- kalviny/IMTA stage 2 (`IMTA_MSDNet`: `net.*`, `classifier.*`, `isc_modules.*`): its frozen GE-trained MSDNet
  `net.*` loads, with its own (stage-1) heads; the ISC heads have no counterpart here and are left out,
  which `Weights.note` says.
- torchvision's `VisionTransformer` state dict (`class_token`, `conv_proj.*`, `encoder.layers.encoder_layer_i.*`,
  `encoder.ln.*`, `heads.*`; torchvision's hub files and `model.state_dict()`): renamed to our ViT's (`embed.*`,
  `blocks.i.*`, `final.*`; the old MLPBlock's `mlp.linear_1/2` to `mlp.0/3`); it has no exit heads, which keep
  their fresh initialisation (`Weights.fresh`, `Weights.note`), and a model's `adapt_state` resizes its position
  embedding to the model's patch grid.
Loading is strict by default: every missing or unexpected key and every shape mismatch is one UsageError line
naming the first ones. The one exception is BatchNorm's `num_batches_tracked` counter, absent from files saved
before PyTorch 0.4.1; it does not affect outputs. Files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.errors import UsageError

_PREFIXES = ("module.",)
_OPTIONAL = "num_batches_tracked"
_WRAPPERS = ("state_dict", "model_state_dict", "model")

# torchvision's VisionTransformer -> bench.backbones.vit, applied in order to every key.
_TORCHVISION_VIT_RULES = [
    (r"^conv_proj\.", "embed.conv_proj."),
    (r"^class_token$", "embed.class_token"),
    (r"^encoder\.pos_embedding$", "embed.pos_embedding"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."),
    (r"\.mlp\.linear_1\.", ".mlp.0."),  # torchvision < 0.13's MLPBlock (its hub files keep these names)
    (r"\.mlp\.linear_2\.", ".mlp.3."),
    (r"^encoder\.ln\.", "final.ln."),
    (r"^heads\.", "final."),
]
_TORCHVISION_VIT_KEYS = {"class_token", "conv_proj.weight", "encoder.pos_embedding", "encoder.ln.weight"}

# RANet-pytorch -> bench.backbones.ranet, applied in order to every key.
_RANET_RULES = [
    (r"^FirstLayer\.layers\.(\d+)\.net\.", r"first.\1."),  # CIFAR stem: ConvBasic
    (r"^FirstLayer\.layers\.(\d+)\.", r"first.\1."),  # ImageNet stem: a plain Sequential
    (r"^scale_flows\.", "flows."),
    (r"\.conv_normal\.net\.", ".conv."),
    (r"\.(conv_up|conv_last|trans)\.net\.", r".\1."),
    (r"^classifier\.(\d+)\.m\.(\d+)\.net\.", r"heads.\1.convs.\2."),
    (r"^classifier\.(\d+)\.linear\.", r"heads.\1.linear."),
]


@dataclass
class Weights:
    """What a checkpoint file holds, in our key names."""

    kind: str  # which format was detected, for messages
    model: dict[str, torch.Tensor]
    wpn: dict[str, torch.Tensor] | None = None  # the l2w weight prediction network, when the file has one
    config: dict[str, Any] | None = None  # exitbench checkpoints only
    readout: dict[str, torch.Tensor] | None = None  # exitbench checkpoints: the method's readout (bench.readout)
    note: str | None = None  # what was deliberately left out
    fresh: tuple[str, ...] = ()  # prefixes of model keys the format cannot hold (a torchvision ViT's exit heads)


def torch_load(path: str | Path, trusted: bool = False) -> Any:
    """`torch.load` to the CPU, weights only unless `trusted`, without the warning torch prints on foreign bytes
    that start like a pickle (what such a file is not becomes the caller's one error line, `load_error`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=not trusted)


def read_file(path: str | Path, trusted: bool = False) -> Any:
    """`torch.load` a checkpoint file (weights_only unless `trusted`); one UsageError line when it cannot."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoint.pt").is_file():  # a run folder
        path = path / "checkpoint.pt"
    if not path.is_file():
        what = "is a folder without checkpoint.pt" if path.is_dir() else "does not exist"
        raise UsageError(f"checkpoint file {str(path)!r} {what}")
    if path.stat().st_size == 0:
        raise UsageError(f"checkpoint file {str(path)!r} is empty (0 bytes); give a file saved by exitbench or a "
                         f"reference project")
    try:
        return torch_load(path, trusted)
    except Exception as err:  # truncated or foreign files raise many kinds
        raise UsageError(f"cannot read {str(path)!r}: {load_error(err)}") from None


def load_error(err: Exception) -> str:
    """What a failed weights-only `torch.load` means, in one line (torch's own message is a paragraph)."""
    text = str(err)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:  # a real pickle with an object that is not a tensor or plain container
        return (f"it pickles {refused.group(1)}, which a weights-only read refuses (tensors and plain containers "
                f"only); if you trust the file, load it from Python with "
                f"bench.backbones.checkpoint.read_file(path, trusted=True)")
    # random bytes fail inside the unpickler's own stack and memo operations too
    if isinstance(err, (pickle.UnpicklingError, IndexError, EOFError)) or "Unsupported operand" in text:
        return "not a file written by torch.save (no pickled tensors in it)"
    return "not a readable torch file: " + (text.strip().splitlines() or [type(err).__name__])[0]


def parse(obj: Any, where: str = "checkpoint") -> Weights:
    """Detect the format of a loaded checkpoint object and return its weights in our key names."""
    if not isinstance(obj, Mapping):
        raise UsageError(f"{where} holds a {type(obj).__name__}, not a checkpoint; expected an exitbench checkpoint "
                         f"or a state_dict (names -> tensors), possibly inside a 'state_dict' entry")
    if "test_logits" in obj and "val_logits" in obj:
        raise UsageError(f"{where} is a logits file (val_logits, test_logits), not a checkpoint: `exitbench "
                         f"budget` reads logits files; a run's weights are its checkpoint.pt")
    if isinstance(obj.get("config"), Mapping) and ("epoch" in obj or "model" in obj or "history" in obj):
        if not isinstance(obj.get("model"), Mapping):
            raise UsageError(f"{where} is an exitbench checkpoint without its 'model' weights; give the run's "
                             f"checkpoint.pt as written by `exitbench train`")
        strategy = obj.get("strategy")
        wpn = strategy.get("wpn") if isinstance(strategy, Mapping) else None
        readout = obj.get("readout")
        return Weights("exitbench", _tensors(obj["model"], where), _tensors(wpn, where) if wpn else None,
                       dict(obj["config"]), dict(readout) if isinstance(readout, Mapping) else None)
    state = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), obj)
    state = _tensors(state, where)
    wpn = obj.get("meta_state_dict")
    wpn = _wpn(_tensors(wpn, where)) if isinstance(wpn, Mapping) else None
    if "first_hidden_layer.fc.weight" in state:
        raise UsageError(f"{where} holds only an L2W-DEN weight prediction network (WPN), no model; give the "
                         f"checkpoint whose 'state_dict' holds the network")
    if _TORCHVISION_VIT_KEYS <= set(state):
        return Weights("torchvision ViT", _rename(state, _TORCHVISION_VIT_RULES), wpn, fresh=("exits.",),
                       note="a torchvision VisionTransformer has no exit heads: the exits (exits.*) keep their "
                            "fresh initialisation")
    if any(k.startswith(("FirstLayer.", "scale_flows.")) for k in state):
        return Weights("RANet-pytorch", _rename(state, _RANET_RULES), wpn)
    if any(k.startswith("isc_modules.") for k in state) and any(k.startswith("net.") for k in state):
        net = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        left = sorted({k.split(".")[0] for k in state if not k.startswith("net.")})
        return Weights("IMTA stage 2", net, wpn, note=f"IMTA stage-2 checkpoint: loaded its GE-trained MSDNet "
                       f"(net.*) with its stage-1 heads; {', '.join(left)} (the ISC heads) have no exitbench "
                       f"counterpart and were left out")
    kind = "L2W-DEN" if wpn is not None else "state_dict"  # MSDNet-PyTorch, IMTA stage 1 or exitbench names
    return Weights(kind, state, wpn)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], where: str = "checkpoint", *,
                 strict: bool = True, fresh: tuple[str, ...] = ()) -> list[str]:
    """Load `state` (our key names) into `model`. Strict: any mismatch is one UsageError line and nothing is
    changed, but model keys starting with a `fresh` prefix may be absent (they keep their values). Not strict:
    every key whose name and shape match is loaded. Returns the model keys left as they were. A model with an
    `adapt_state(state) -> state` method (the ViT's position embedding resize) adapts `state` first."""
    adapt = getattr(model, "adapt_state", None)
    if callable(adapt):
        state = adapt(dict(state))
    expected = model.state_dict()
    if strict:
        _check(model, state, where, fresh)
        model.load_state_dict(state, strict=False)  # _check proved the keys equal, up to num_batches_tracked
        return [k for k in expected if k not in state and k.startswith(fresh)]
    fitting = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    if not fitting:
        raise UsageError(f"{where}: not one key of it fits the {type(model).__name__} built from this config "
                         f"(first keys: {_first(list(state))}); check the backbone")
    model.load_state_dict(fitting, strict=False)
    return [k for k in expected if k not in fitting and not k.endswith(_OPTIONAL)]


def load_reference_checkpoint(model: nn.Module, path_or_state: str | Path | Mapping[str, Any], *,
                              trusted: bool = False) -> nn.Module:
    """Strictly load a checkpoint (file path, checkpoint dict or state_dict, any format above) into `model`."""
    where = "checkpoint"
    if isinstance(path_or_state, str | Path):
        where = str(path_or_state)
        path_or_state = read_file(path_or_state, trusted)
    weights = parse(path_or_state, where)
    load_weights(model, weights.model, f"{where} ({weights.kind} checkpoint)")
    return model


def _tensors(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """A state_dict with any DataParallel/DDP `module.` prefix removed."""
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
        raise UsageError(f"{where}: expected a state_dict (names -> tensors) or a dict with a 'state_dict' "
                         f"entry, got {keys or 'an empty dict'}")
    state = dict(obj)
    for prefix in _PREFIXES:
        while state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def _wpn(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """L2W-DEN's MLP_tanh names -> our WeightPredictor's Sequential indices (Linear, ReLU pairs, last Linear)."""
    if "first_hidden_layer.fc.weight" not in state:
        return state  # already ours
    rest = {int(m.group(1)) for k in state if (m := re.match(r"rest_hidden_layers\.(\d+)\.", k))}
    last = 2 * (len(rest) + 1)
    rules = [(r"^first_hidden_layer\.fc\.", "net.0."),
             (r"^rest_hidden_layers\.(\d+)\.fc\.", lambda m: f"net.{2 * (int(m.group(1)) + 1)}."),
             (r"^output_layer\.", f"net.{last}.")]
    return _rename(state, rules)


def _check(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, fresh: tuple[str, ...] = ()) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL) and not k.startswith(fresh)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{len(items)} {what} ({_first(items)})"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if items]
    if problems:
        raise UsageError(f"{where} does not match the {type(model).__name__} built from this config: "
                         + "; ".join(problems) + " - check the backbone preset/options and the class count "
                         "it was trained with")


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def init_from(path: str | Path, model: nn.Module, strategy: Any = None, *, strict: bool = True) -> Weights:
    """Start training from a checkpoint file: its model weights into `model` and, when both the file and the
    strategy have one (l2w), its WPN into `strategy.wpn`. Prints what was loaded or left out."""
    where = f"init.checkpoint {str(path)!r}"
    weights = parse(read_file(path), where)
    left = load_weights(model, weights.model, f"{where} ({weights.kind} checkpoint)", strict=strict,
                        fresh=weights.fresh)
    wpn = getattr(strategy, "wpn", None)
    loaded_wpn = weights.wpn is not None and isinstance(wpn, nn.Module)
    if loaded_wpn:
        load_weights(wpn, weights.wpn, f"{where} (WPN)", strict=strict)
    extra = f"; {len(left)} model keys kept their fresh values ({_first(left)})" if left else ""
    print(f"init: {weights.kind} weights from {path}{' with the WPN' if loaded_wpn else ''}{extra}"
          + (f"; note: {weights.note}" if weights.note else ""), flush=True)
    return weights


def local_weights_path(arch: str) -> str:
    """Where torch hub caches `arch`'s default torchvision weights (the only place `pretrained` reads)."""
    import os

    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def read_local_weights(arch: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(path, state dict) of `arch`'s torchvision weights from the local hub cache, never downloaded; a missing,
    unreadable or foreign file is one line naming the path and the way out (`pretrained: true` of sdn and vit)."""
    import os

    from bench.errors import ConfigError

    path = local_weights_path(arch)
    if not os.path.exists(path):
        raise ConfigError(f"backbone.pretrained: no local weights for {arch} at {path} (nothing is downloaded); "
                          f"put the file there or set pretrained=false")
    try:
        state = torch_load(path)  # weights only: no code runs
    except Exception as err:  # a foreign, truncated or malicious file in the hub cache
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise ConfigError(f"backbone.pretrained: {path} is not {arch}'s torchvision weights ({type(err).__name__}"
                          f"{': ' + lines[0][:200] if lines else ''}); remove it and put the weights file "
                          f"there, or set pretrained=false") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"backbone.pretrained: {path} holds a {type(state).__name__}, not a state dict of "
                          f"tensors; remove it and put {arch}'s torchvision weights there, or set pretrained=false")
    return path, state
