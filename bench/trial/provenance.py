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


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(device) -> dict[str, str]:
    """What the numbers depend on beyond the code and the seed: the device that ran the trial (its CPU model,
    or GPU name), the vector instructions torch's CPU kernels use, and the math libraries (parallel backend,
    BLAS, oneDNN). The same trial on another CPU family sums floats in another order, and training amplifies
    the last bits (digits' tiny net: 68 % vs 72 % validation accuracy after one epoch on AVX2 vs AVX512)."""
    import re

    import torch

    info = torch.__config__.parallel_info()
    backend = re.search(r"ATen parallel backend: (.+)", info)
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", info)
    onednn = re.search(r"MKL-DNN (v[\d.]+)", info)
    math = [backend[1].strip() if backend else "parallel backend unknown",
            f"MKL {mkl[1]}" if mkl else "no MKL", f"oneDNN {onednn[1]}" if onednn else "no oneDNN"]
    device = torch.device(device)
    out = {"device": device.type, "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "math": "; ".join(math)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = str(torch.version.cuda)
    return out
