"""Load weights saved by a reference implementation (kalviny/MSDNet-PyTorch and its copies) into our model.

Our MSDNet mirrors the reference's module names, so no key translation is needed; what differs between
checkpoints in the wild is only the wrapping:
- a raw `model.state_dict()`;
- the same with every key prefixed by `module.` (saved from DataParallel / DistributedDataParallel, as the
  reference's main.py does);
- the reference's checkpoint dict `{'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}`.
Loading is strict: every missing or unexpected key and every shape mismatch is an error. The one exception
is BatchNorm's `num_batches_tracked` counter, absent from checkpoints saved before PyTorch 0.4.1; it does
not affect the outputs, and PyTorch itself fills it in for such files.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.errors import UsageError

_PREFIXES = ("module.",)
_OPTIONAL = "num_batches_tracked"


def load_reference_checkpoint(model: nn.Module, path_or_state: str | Path | Mapping[str, Any], *,
                              trusted: bool = False) -> nn.Module:
    """Strictly load a reference checkpoint (file path, checkpoint dict or state_dict) into `model`.

    Files are read with `torch.load(weights_only=True)` unless `trusted` (needed only for files that pickle
    objects other than tensors, numbers, strings and containers). Raises UsageError with one line on any
    mismatch. Returns `model`.
    """
    where = "checkpoint"
    if isinstance(path_or_state, str | Path):
        where = str(path_or_state)
        path_or_state = _read(Path(path_or_state), trusted)
    state = _unwrap(path_or_state, where)
    _check(model, state, where)
    model.load_state_dict(state, strict=True)
    return model


def _read(path: Path, trusted: bool) -> Any:
    if not path.is_file():
        raise UsageError(f"checkpoint file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot read {str(path)!r} safely ({first}); if you trust the file, load it with "
                         f"trusted=True") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UsageError(f"cannot read {str(path)!r} as a torch checkpoint: {err}") from None


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint dict, with any DataParallel/DDP `module.` prefix removed."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
        raise UsageError(f"{where}: expected a state_dict (names -> tensors) or a dict with a 'state_dict' "
                         f"entry, got {keys or 'an empty dict'}")
    state = dict(obj)
    for prefix in _PREFIXES:
        while state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _check(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{len(items)} {what} ({_first(items)})"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if items]
    if problems:
        raise UsageError(f"{where} does not match the {type(model).__name__} built from this config: "
                         + "; ".join(problems) + " - check the preset/options it was trained with")


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
