"""A trial's files, wherever they live: checkpoints written whole and read back with one-line errors, the trial
folder's numbered checkpoints (a sweep's) and the one a resumed attempt continues from, and text files on a
local path or an object-store URI (pyarrow filesystems). The engine (bench.trial.train), its DDP workers, the
Ray Train driver and the sweep all go through here; nothing here trains.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from bench.errors import UsageError
from bench.results import atomic_write_bytes, atomic_write_text
from bench.runfolder import CHECKPOINT, METRICS

CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")  # Tune's names for a trial's persisted checkpoints
RESUME_DIR = "checkpoint_resume"  # in a trial folder: the checkpoint its current attempt continued from
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str) -> bool:
    return bool(_URI.match(location))


def filesystem(location: str):
    """(pyarrow filesystem, path) of a local path or a URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(location) if is_uri(location) else (pafs.LocalFileSystem(), location)


def write_text(location: str, text: str) -> None:
    if is_uri(location):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(location)
        fs.create_dir(path.rsplit("/", 1)[0])
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
    else:
        atomic_write_text(Path(location), text)


def read_text(location: str) -> str | None:
    if is_uri(location):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(location)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.readall().decode()
    path = Path(location)
    return path.read_text() if path.is_file() else None


def copy_file(source: str, dest: Path) -> None:
    """A file given as a local path or a URI, copied to a local path."""
    fs, path = filesystem(source)
    with fs.open_input_stream(path) as src:
        dest.write_bytes(src.readall())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UsageError(f"no checkpoint at {str(path)!r} (expected a run folder or its {CHECKPOINT})")
    from bench.backbones.checkpoint import load_error, torch_load

    try:
        return torch_load(path)
    except Exception as err:  # a truncated or foreign file: say what it is, not a traceback
        raise UsageError(f"cannot read checkpoint {str(path)!r}: {load_error(err)}") from None


RESUME_KEYS = ("epoch", "model", "optimizer", "scheduler", "strategy", "rng", "history", "train_time",
               "train_images")


def check_resumable(state: Any, path: Path) -> None:
    """A checkpoint `train --resume` can continue: written by `bench.trial.train.run` (another kind of torch file,
    e.g. a bare state dict or a logits file, is one line, not a KeyError half-way through)."""
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        kind = f"a {type(state).__name__}" + (f" without {', '.join(repr(k) for k in missing[:3])}"
                                              if isinstance(state, dict) else "")
        raise UsageError(f"{str(path)!r} is not a training checkpoint of exitbench ({kind}); remove it or choose "
                         f"another out_dir=...")


def _epochs_in(fs, folder: str) -> int:
    """Epochs a checkpoint folder claims (lines of its metrics.jsonl): the order in which to try them."""
    try:
        with fs.open_input_stream(f"{folder}/{METRICS}") as f:
            return sum(1 for line in f.readall().decode().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        return -1


def restore_checkpoint(trial_dir: str, dest: Path) -> bool:
    """Continue a trial from its own folder: copy the newest of its checkpoints that loads to `dest` (the
    engine's run folder) and keep it as `checkpoint_resume/`, then drop the numbered ones of the previous
    attempt (Tune numbers each attempt's checkpoints from 0 again, and the retention limit counts only its own).
    Returns False if the trial has no readable checkpoint (it starts from epoch 0).

    Nothing here depends on Ray Tune's experiment state: a crash that truncated it, or a retention limit that
    deleted the checkpoint it names, leaves this path intact. A copy cut short by a crash does not load and
    the next older one is taken.
    """
    import pyarrow.fs as pafs

    from bench.backbones.checkpoint import torch_load

    fs, root = filesystem(trial_dir)
    found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    numbered = [f.path for f in found if f.type == pafs.FileType.Directory and CHECKPOINT_DIR.fullmatch(f.base_name)]
    kept = [f.path for f in found if f.type == pafs.FileType.Directory and f.base_name.startswith(RESUME_DIR)]
    for folder in sorted(numbered + kept, key=lambda f: _epochs_in(fs, f), reverse=True):
        try:
            with fs.open_input_stream(f"{folder}/{CHECKPOINT}") as src:
                dest.write_bytes(src.readall())
            torch_load(dest)  # a copy cut short by a crash does not load
        except Exception:  # missing or truncated: try the next older one
            dest.unlink(missing_ok=True)
            continue
        resume = f"{root}/{RESUME_DIR}"
        if folder != resume:  # keep the one resumed from under a fixed name, written before the others go
            staging = f"{resume}.tmp"
            if folder != staging:
                fs.delete_dir_contents(staging, missing_dir_ok=True)
                fs.create_dir(staging)
                for name in (CHECKPOINT, METRICS):
                    if fs.get_file_info(f"{folder}/{name}").type == pafs.FileType.File:
                        fs.copy_file(f"{folder}/{name}", f"{staging}/{name}")
            if fs.get_file_info(resume).type == pafs.FileType.Directory:
                fs.delete_dir(resume)
            try:
                fs.move(staging, resume)
            except (OSError, NotImplementedError):  # object stores rename no folders: copy, then drop
                pafs.copy_files(staging, resume, source_filesystem=fs, destination_filesystem=fs)
                fs.delete_dir(staging)
        for old in numbered:
            fs.delete_dir(old)
        return True
    return False
