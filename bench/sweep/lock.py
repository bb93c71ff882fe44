"""One driver per sweep folder: `driver.lock` and the Ray processes a dead driver left behind."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune

from bench import results
from bench.errors import UsageError

LOCK_FILE = "driver.lock"


class DriverLock(tune.Callback):
    """`driver.lock` in the sweep folder: the driver's pid, host and start time, and the Ray processes it
    started (pid and start time, refreshed while it runs). A second driver refuses while the owner lives; once
    the owner is dead, the next driver ends the Ray processes the owner started that outlived it (they could
    still be training into the sweep folder), checking each one's start time so a reused pid is never hit,
    and takes the lock over. Only for sweep folders on a local or shared filesystem."""

    def __init__(self, sweep_dir: str):
        self.path = Path(sweep_dir) / LOCK_FILE
        self.owned = False
        self.ray: list[dict[str, float]] = []
        self._recorded = 0.0

    @staticmethod
    def _me() -> dict[str, Any]:
        import psutil

        return {"pid": os.getpid(), "host": socket.gethostname(), "started": psutil.Process().create_time()}

    def _write(self) -> None:
        results.atomic_write_text(self.path, json.dumps({**self._me(), "ray": self.ray}))

    @staticmethod
    def _alive(pid: int, started: float) -> bool:
        import psutil

        try:
            return abs(psutil.Process(pid).create_time() - started) < 0.05
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return False

    def acquire(self) -> None:
        import psutil

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                    pid, host, started = int(owner["pid"]), str(owner["host"]), float(owner["started"])
                except (OSError, ValueError, KeyError, TypeError):
                    owner = None  # cut short while its driver wrote it: no driver got past this point
                if owner is not None and host != socket.gethostname():
                    raise UsageError(f"sweep folder {self.path.parent} is locked by a driver on host {host} (pid "
                                     f"{pid}); if that driver is gone, delete {self.path} and resume again") from None
                if owner is not None and self._alive(pid, started):
                    raise UsageError(f"sweep folder {self.path.parent} is in use by another driver (pid {pid} on "
                                     f"this host); wait for it to end, or end it, then resume") from None
                orphans = [psutil.Process(p["pid"]) for p in (owner or {}).get("ray", [])
                           if self._alive(int(p["pid"]), float(p["started"]))]
                for proc in orphans:  # Ray processes of a dead driver, started by it: still writing here
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
                psutil.wait_procs(orphans, timeout=10)
                if orphans:
                    print(f"exitbench: ended {len(orphans)} Ray processes left by the dead driver {pid}",
                          file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            os.close(fd)
            self._write()
            self.owned = True
            return
        raise UsageError(f"sweep folder {self.path.parent}: another driver took {self.path} at the same time")

    def record_ray(self) -> None:
        """Remember the Ray processes this driver started (all its descendants: GCS, raylet, workers)."""
        import psutil

        if not self.owned:
            return
        procs = []
        for proc in psutil.Process().children(recursive=True):
            try:
                procs.append({"pid": proc.pid, "started": proc.create_time()})
            except psutil.Error:
                pass
        if procs != self.ray:
            self.ray = procs
            self._write()
        self._recorded = time.time()

    def on_step(self, iteration, trials, **info):
        if self.ray and time.time() - self._recorded > 2:  # new trial workers
            self.record_ray()

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.ray:
            self.record_ray()

    def release(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False
