"""Per-exit outputs of a trained model: collected from it, checked, stored in and read back from a logits file.

A logits file (a run folder's `logits.pt`, bench.runfolder.LOGITS) is one `.pt` file per run with `val_logits`
[K, N, C] (the calibration split), `val_labels` [N], `test_logits` [K, M, C], `test_labels` [M] and `macs` [K]
(cumulative multiply-adds up to and including exit k, earlier heads included). The logits are what the exits
report: the outputs of the strategy's readout (bench.readout; the raw exit logits for every strategy without
one), and `macs` include the readout's cost. A run's file also keeps the raw exits (`val_raw_logits`,
`test_raw_logits`; with the identity readout they share one storage, saved once) and the readout's share of the
MACs (`readout_macs`). Everything in bench.evaluate.protocol works on such a dict, no model needed.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bench.errors import UsageError
from bench.runfolder import LOGITS, TRIAL_RUN

KEYS = ("val_logits", "val_labels", "test_logits", "test_labels", "macs")


class Collected(NamedTuple):
    outputs: torch.Tensor  # [K, N, C] float32 on CPU: what the exits report (the readout's outputs)
    raw: torch.Tensor  # [K, N, C] the backbone's raw exit logits (the same tensor when the readout is identity)
    labels: torch.Tensor  # [N] long


def collect_exits(model, loader, device, readout=None, *, progress: bool = False,
                  desc: str = "evaluating") -> Collected:
    """Every exit's raw logits over `loader` and what the exits report through `readout` (bench.readout;
    None or the identity: the raw logits). Eval mode for both; their previous modes are restored. The batches
    run as bench.evaluate.batches.map_batches runs them (in parallel on a CPU, the same bits); `progress`: a
    progress bar on stderr named `desc`."""
    from bench.evaluate.batches import map_batches
    from bench.readout import Readout, readout_outputs

    identity = readout is None or type(readout) is Readout
    modules = [model] if identity else [model, readout]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()

    def outputs(x, y):
        raw = [z.float() for z in model(x)]
        reported = None if identity else torch.stack([o.float() for o in readout_outputs(readout, raw)]).cpu()
        return torch.stack(raw).cpu(), reported, torch.as_tensor(y).long().cpu()

    raw_parts, out_parts, labels = [], [], []
    try:
        for raw, reported, y in map_batches(outputs, loader, device, progress=progress, desc=desc):
            raw_parts.append(raw)
            if not identity:
                out_parts.append(reported)
            labels.append(y)
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    if not raw_parts:
        raise UsageError("collect_logits: the loader yielded no batches; the split is empty")
    raw = torch.cat(raw_parts, dim=1)
    return Collected(raw if identity else torch.cat(out_parts, dim=1), raw, torch.cat(labels))


def collect_logits(model, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's raw logits over `loader` -> (logits [K, N, C] float32 on CPU, labels [N] long)."""
    collected = collect_exits(model, loader, device)
    return collected.raw, collected.labels


def validate_logits(data: Any, source: str = "logits") -> dict[str, torch.Tensor]:
    """Check a logits dict and return it normalised (float32 logits, long labels, float64 macs).

    Bad content raises UsageError with one line naming `source`, the key and what would be right."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: holds a {type(data).__name__}, expected a dict with keys {', '.join(KEYS)}")
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise UsageError(f"{source}: missing key(s) {', '.join(missing)} (expected {', '.join(KEYS)})")
    for split in ("val", "test"):
        logits, labels = data[f"{split}_logits"], data[f"{split}_labels"]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise UsageError(f"{source}: {split}_logits must be a floating-point [K, N, C] tensor, got {shape}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
                or labels.is_complex() or labels.dtype == torch.bool:
            shape = (f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor)
                     else type(labels).__name__)
            raise UsageError(f"{source}: {split}_labels must be a 1-D integer tensor, got {shape}")
        if min(logits.shape) == 0:
            raise UsageError(f"{source}: {split}_logits has shape {tuple(logits.shape)}; need K, N, C >= 1")
        if labels.numel() != logits.shape[1]:
            raise UsageError(f"{source}: {split}_labels has {labels.numel()} labels but {split}_logits has "
                             f"N={logits.shape[1]} samples; they must match")
    (Kv, _, Cv), (Kt, _, Ct) = data["val_logits"].shape, data["test_logits"].shape
    if Kv != Kt:
        raise UsageError(f"{source}: val_logits has K={Kv} exits but test_logits has K={Kt}; they must match")
    if Cv != Ct:
        raise UsageError(f"{source}: val_logits has C={Cv} classes but test_logits has C={Ct}; they must match")
    out: dict[str, torch.Tensor] = {}
    for split in ("val", "test"):
        logits = data[f"{split}_logits"].detach().cpu().float().contiguous()
        # min and max propagate NaN and reach +-inf, so finite extremes prove every value finite without
        # a full-size mask; count the bad values only when they are not.
        low, high = torch.aminmax(logits)
        bad = 0 if math.isfinite(float(low)) and math.isfinite(float(high)) else int((~torch.isfinite(logits)).sum())
        if bad:
            raise UsageError(f"{source}: {split}_logits holds {bad} NaN/inf values; logits must be finite")
        labels = data[f"{split}_labels"].detach().cpu().long()
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= Cv:
            raise UsageError(f"{source}: {split}_labels range {low}..{high} is outside the {Cv} classes "
                             f"(labels must be in 0..{Cv - 1})")
        out[f"{split}_logits"], out[f"{split}_labels"] = logits, labels
    try:
        macs = torch.as_tensor(data["macs"], dtype=torch.float64).flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(f"{source}: macs must be a list or 1-D tensor of K={Kv} numbers") from None
    if macs.numel() != Kv:
        raise UsageError(f"{source}: macs has {macs.numel()} entries but the logits have K={Kv} exits; "
                         f"give one cumulative MACs count per exit")
    if not bool(torch.isfinite(macs).all()) or bool((macs < 0).any()):
        raise UsageError(f"{source}: macs must be finite and >= 0, got {macs.tolist()}")
    if Kv > 1 and not bool((macs[1:] > macs[:-1]).all()):
        raise UsageError(f"{source}: macs must increase strictly from exit to exit (cumulative MACs), "
                         f"got {macs.tolist()}")
    out["macs"] = macs
    for split in ("val", "test"):  # optional: the backbone's raw exits beside the readout outputs
        key = f"{split}_raw_logits"
        if key in data:
            raw, shape = data[key], tuple(out[f"{split}_logits"].shape)
            if not isinstance(raw, torch.Tensor) or not raw.is_floating_point() or tuple(raw.shape) != shape:
                got = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
                raise UsageError(f"{source}: {key} must be a floating-point tensor shaped like {split}_logits "
                                 f"{shape}, got {got}")
            out[key] = raw.detach().cpu().float().contiguous()
    if "readout_macs" in data:  # optional: the readout's share of the cumulative MACs
        try:
            share = torch.as_tensor(data["readout_macs"], dtype=torch.float64).flatten().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise UsageError(f"{source}: readout_macs must be a list or 1-D tensor of K={Kv} numbers") from None
        if share.numel() != Kv or not bool(torch.isfinite(share).all()) or bool((share < 0).any()) \
                or bool((share > macs).any()):
            raise UsageError(f"{source}: readout_macs must be K={Kv} finite numbers in 0..macs (the readout's "
                             f"share of each exit's MACs), got {share.tolist()}")
        out["readout_macs"] = share
    return out


def save_logits(path, val_logits, val_labels, test_logits, test_labels, macs, *, raw=None,
                readout_macs=None) -> None:
    """Write one `.pt` file with the five keys, after validating them, atomically: into a temp file in the
    same folder, then renamed over `path`, so a crash never leaves a half-written file. `raw` = (val, test)
    raw exit logits and `readout_macs` (the readout's share of `macs`) are stored beside them when given."""
    path = Path(path)
    data = {"val_logits": val_logits, "val_labels": val_labels, "test_logits": test_logits,
            "test_labels": test_labels, "macs": macs}
    if raw is not None:
        data["val_raw_logits"], data["test_raw_logits"] = raw
    if readout_macs is not None:
        data["readout_macs"] = readout_macs
    data = validate_logits(data, source=str(path))
    # torch.save writes a view's whole storage; copy views of bigger tensors so only the data is saved.
    data = {k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
            for k, v in data.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_logits(path) -> dict[str, torch.Tensor]:
    """Read and validate a logits file (weights-only load: tensors, no arbitrary pickles)."""
    path = Path(path)
    if path.is_dir():  # a run folder: its logits.pt; a sweep's trial folder: its run/logits.pt
        if not (path / LOGITS).is_file() and (path / TRIAL_RUN / LOGITS).is_file():
            path = path / TRIAL_RUN
        if not (path / LOGITS).is_file():
            raise UsageError(f"{str(path)!r} is a folder without logits.pt; give a logits file, the folder of a "
                             f"finished `exitbench train` run or a finished sweep trial's folder")
        path = path / LOGITS
    if not path.is_file():
        raise UsageError(f"logits file {str(path)!r} not found")
    from bench.backbones.checkpoint import load_error, torch_load

    try:
        data = torch_load(path)
    except Exception as err:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError, ...)
        raise UsageError(f"cannot read logits file {str(path)!r}: {load_error(err)}") from None
    if isinstance(data, dict) and data and not any(k in data for k in KEYS) and (any(
            k in data for k in ("model", "state_dict", "model_state_dict", "epoch", "optimizer"))
            or all(isinstance(v, torch.Tensor) for v in data.values())):  # a bare state dict
        import shlex

        raise UsageError(f"{str(path)!r} is a checkpoint, not a logits file: `exitbench evaluate "
                         f"{shlex.quote(str(path))}` runs it on its data (or give a run's {LOGITS})")
    return validate_logits(data, source=str(path))

