"""A run folder's files, by name: what `exitbench train` (and each sweep trial) writes, and what evaluation,
latency and resume read back.

    config.yaml     the validated, fully defaulted TrialConfig
    checkpoint.pt   model, readout, optimiser, scheduler, strategy state, RNG states, epoch (written atomically)
    metrics.jsonl   one line of metrics per finished epoch
    logits.pt       per-exit outputs (readout applied) and raw logits on the calibration and test splits
                    (bench.evaluate.logits)
    result.json     the ResultRecord (bench.results)

and where a sweep's trial folder keeps them (`trial_folder`, `latest_checkpoint`), so that every command that
reads a run also takes a sweep's trial folder.
"""

import re
from pathlib import Path

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOGITS = "logits.pt"
RESULT = "result.json"

# A sweep's trial folder (<storage_path>/<sweep>/<key>_<label>/): Ray Tune's files, the epoch checkpoints it kept
# (checkpoint_NNNNNN/, and checkpoint_resume/ after a resume: each a checkpoint.pt and its metrics.jsonl) and,
# once the trial finished, the run folder TRIAL_RUN (config, metrics, logits, result; no checkpoint).
TRIAL_RUN = "run"
SWEEP_JOBS = "jobs.json"  # in the sweep folder: every trial's config, and the plugins (--include) it started with
TRIAL_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+|resume)")


def _epochs_claimed(folder: Path) -> int:
    """Epochs a kept checkpoint folder holds (lines of its metrics.jsonl); -1 when unreadable."""
    try:
        return sum(1 for line in (folder / METRICS).read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        return -1


def trial_folder(path: Path) -> Path | None:
    """The sweep trial folder `path` names: the trial folder itself or its run/ folder; None for anything else."""
    for folder in (path, path.parent if path.name == TRIAL_RUN else None):
        if folder is not None and folder.is_dir() and (
                (folder / TRIAL_RUN).is_dir() or any(TRIAL_CHECKPOINT_DIR.fullmatch(p.name) for p in folder.iterdir())):
            return folder
    return None


def latest_checkpoint(trial_dir: Path) -> Path | None:
    """The newest checkpoint.pt a sweep's trial folder kept: the one of most epochs (a resumed attempt numbers its
    checkpoints from 0 again), the highest number among equals; None if it kept none."""
    kept = [(p, m) for p in trial_dir.iterdir() if (m := TRIAL_CHECKPOINT_DIR.fullmatch(p.name))
            and (p / CHECKPOINT).is_file()]
    if not kept:
        return None
    newest = max(kept, key=lambda pm: (_epochs_claimed(pm[0]), pm[1].group(1).isdigit(),
                                       int(pm[1].group(1)) if pm[1].group(1).isdigit() else -1))
    return newest[0] / CHECKPOINT


def sweep_includes(path: Path) -> list[str]:
    """The plugins (`--include` paths) the sweep holding `path` (a trial folder, its run/ folder or a checkpoint
    in them) was started with, as its jobs.json records them; [] outside a sweep."""
    import json

    for folder in list(path.absolute().parents)[:4]:
        if (folder / SWEEP_JOBS).is_file():
            try:
                return [str(p) for p in json.loads((folder / SWEEP_JOBS).read_text()).get("includes") or []]
            except (ValueError, AttributeError, TypeError, OSError):
                return []
    return []
