"""What made a result: the package versions (with torch's thread count, which fixes float summation order) and
the git commit of the code, recorded in every trial's ResultRecord."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    # The intra-op thread count changes float summation order, hence the last digits of results.
    out = {"python": platform.python_version(), "torch_threads": str(torch.get_num_threads())}
    for name in ("exitbench", "torch", "torchvision", "fvcore", "ray", "numpy", "pandas"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    return done.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
