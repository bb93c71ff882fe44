"""Where a sweep runs: the checks before Ray starts (one line for input the config models cannot judge alone, data
that cannot work, trials that fit no node), Ray itself (a local instance or a cluster at an address, with its
logs kept to what a user needs), and the Tune side of distributed trials: a DDP trial's Tune slot is a small
driver, its workers hold their own placement group, and no more such trials run at once than the cluster holds
whole (ray-project/ray#54305)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import socket
from typing import Any

from bench.config import SweepConfig
from bench.errors import UsageError, last_line
from bench.sweep.loggers import logger_callbacks

EPOCH_METRICS = re.compile(r"^(loss|lr|time_s|images_per_s|val_acc_last|(val_acc|train_acc|train_loss)_\d+)$")
DRIVER_CPU = 0.1  # a distributed trial's Tune slot: it only starts the worker group and waits for it


def preflight(sweep: SweepConfig) -> None:
    """Bad input that the config models cannot see on their own: one line, before any Ray work."""
    res = sweep.resources
    for key, value in (("cpu", res.cpu), ("gpu", res.gpu)):
        if value > 1 and value != int(value):
            raise UsageError(f"resources.{key}={value}: fractions are allowed only below 1 (e.g. 0.5); use a whole "
                             f"number above 1")
    if sweep.search.scheduler == "asha" and not EPOCH_METRICS.match(sweep.search.metric):
        raise UsageError(f"search.metric={sweep.search.metric!r} is not a per-epoch metric; use val_acc_last, "
                         f"val_acc_K, train_acc_K, train_loss_K or loss")
    if res.gpu == 0 and any(t.device.startswith("cuda") and t.workers.count == 1 for t in sweep.trials()):
        raise UsageError("device=cuda needs resources.gpu > 0 (Ray hides GPUs from trials that ask for none); "
                         "set resources.gpu=1 (or 0.5 to share) or device=auto")
    if any(t.device.startswith("cuda") and t.workers.count > 1 and t.workers.gpu == 0 for t in sweep.trials()):
        raise UsageError("device=cuda with workers.count > 1 needs workers.gpu > 0 (Ray hides GPUs from workers "
                         "that ask for none); set workers.gpu=1 or device=auto")
    logger_callbacks(sweep)  # a tracker whose package is missing: one line now, not a failed sweep later
    if sweep.report is not None:
        check_report(sweep)


def check_report(sweep: SweepConfig) -> None:
    """The sweep's `report` section, judged as the report after the last trial would judge it: known options of
    the right types, a writable `out`, a known metric, and a baseline that names a method (or a variant, as the
    tables name it) of the grid; the variants are computed from the sweep's trials as the report computes them
    from the store."""
    from bench.report.build import build_report
    from bench.report.frame import METRICS

    report = sweep.report
    allowed = [p for p in inspect.signature(build_report).parameters if p != "sweep_dir"]
    unknown = sorted(set(report) - set(allowed))
    if unknown:
        raise UsageError(f"report.{unknown[0]}: unknown report option; valid: {', '.join(allowed)}")
    for key in ("plots", "copy_store"):
        if key in report and not isinstance(report[key], bool):
            raise UsageError(f"report.{key}: {report[key]!r} is not true or false")
    for key in ("out", "baseline", "metric"):
        if report.get(key) is not None and not isinstance(report[key], str):
            raise UsageError(f"report.{key}: {report[key]!r} is not a text; give a {'folder' if key == 'out' else key}")
    if report.get("speedup_acc") is not None and (isinstance(report["speedup_acc"], bool) or not isinstance(
            report["speedup_acc"], (int, float)) or not 0 < report["speedup_acc"] <= 100):
        raise UsageError(f"report.speedup_acc: {report['speedup_acc']!r} is not a top-1 accuracy in (0, 100]")
    if report.get("metric", "auc") not in METRICS:
        raise UsageError(f"report.metric: unknown metric {report['metric']!r}; valid: {', '.join(METRICS)}")
    if report.get("out") is not None:
        from bench.errors import check_output_dir

        check_output_dir(report["out"], f"report.out={report['out']}")
    if report.get("baseline") is not None:
        import pandas as pd

        from bench import results
        from bench.report.frame import annotate, resolve_baseline
        from bench.sweep.grid import expand

        rows = [{"trial_id": job["key"], "status": "finished", "seed": job["trial"]["seed"],
                 **{f"config.{k}": v for k, v in results.flatten(job["trial"]).items()}}
                for job in expand(sweep, "check")]
        runs = annotate(results.Tables(pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame(), pd.DataFrame())).runs
        try:
            resolve_baseline(runs, report["baseline"])
        except UsageError as err:
            raise UsageError(f"report.baseline: {str(err).removeprefix('--baseline ')}") from None


def check_data(trials: list[dict[str, Any]]) -> None:
    """Build each distinct data section's splits once, here, as `exitbench train` does before training: a data
    setting that cannot work (val_size larger than the training set, files missing) is one line before Ray
    starts, not a failure in every trial. Only for a local Ray: a cluster's workers may see other files."""
    from bench.datasets import make_splits

    seen = set()
    for raw in trials:
        section = raw["data"]
        key = json.dumps(section, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        make_splits(section, int(raw.get("seed", 0)))


def check_fits(sweep: SweepConfig, nodes: list[dict[str, float]], where: str) -> None:
    """Every trial of the sweep fits `where` (its nodes' resources): one trial's resources on some node, a
    distributed trial's worker group in the whole cluster."""
    check_groups_fit([t.model_dump() for t in sweep.trials()], nodes, where)
    res = sweep.resources
    if any(n.get("CPU", 0) >= res.cpu and n.get("GPU", 0) >= res.gpu for n in nodes):
        return
    cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    gpu = max((n.get("GPU", 0) for n in nodes), default=0)
    raise UsageError(f"resources per trial (cpu={res.cpu:g}, gpu={res.gpu:g}) are more than {where} has on one "
                     f"node ({cpu:g} CPUs, {gpu:g} GPUs); lower resources.cpu / resources.gpu")


def local_machine() -> dict[str, float]:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


class _NoTrialTracebacks(logging.Filter):
    """Tune logs a full traceback per failed trial; the summary names each error and its error.txt instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Trial task failed", "Trials did not complete",
                                                "Experiment has been interrupted"))


def _quiet_logs(quiet: bool) -> None:
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.WARNING)
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTrialTracebacks) for f in logger.filters):
            logger.addFilter(_NoTrialTracebacks())


def connect(address: str | None, quiet: bool) -> bool:
    """Ray for this sweep: the running one (tests), a cluster at `address` / $RAY_ADDRESS, or a local Ray sized
    to this machine. Returns True if this call started or joined Ray (and so should shut it down)."""
    import ray

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new output engine ignores CLIReporter and its columns
    _quiet_logs(quiet)
    address = address or os.environ.get("RAY_ADDRESS")
    host_port = re.fullmatch(r"([A-Za-z0-9.-]+):(\d+)", address or "")
    if host_port:  # Ray itself retries an unreachable address for minutes
        try:
            socket.create_connection((host_port[1], int(host_port[2])), timeout=10).close()
        except OSError as err:
            raise UsageError(f"cannot reach the Ray cluster at {address!r} ({err.strerror or err}); start it with "
                             f"`ray start --head --port {host_port[2]}` or check the address") from None
    if ray.is_initialized():
        return False
    level = logging.ERROR if quiet else logging.WARNING
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=level)
        else:
            # "local": a new instance even if a `ray start` cluster runs here (ray.init() would join it)
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=level)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        hint = "; start one with `ray start --head` or check the address" if address else ""
        raise UsageError(f"cannot start or reach {where}: {last_line(str(err))}{hint}") from None
    _quiet_logs(quiet)  # ray.init configures its loggers again
    return True


def ray_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def is_distributed(trial: dict[str, Any]) -> bool:
    return int((trial.get("workers") or {}).get("count", 1)) > 1


def footprint(trial: dict[str, Any], cpu: float, gpu: float) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds while it runs: its Tune slot, plus its worker group when distributed."""
    if not is_distributed(trial):
        return cpu, gpu
    w = trial["workers"]
    return DRIVER_CPU + w["count"] * w["cpu"], w["count"] * w["gpu"]


def trial_resources(cpu: float, gpu: float):
    """Tune's resources per trial: the sweep's `resources` for a one-process trial; for a distributed one a
    small driver slot (its workers hold their own placement group)."""

    from ray.tune import PlacementGroupFactory

    def resources(config: dict[str, Any]) -> PlacementGroupFactory:
        if is_distributed(config["point"]["trial"]):
            return PlacementGroupFactory([{"CPU": DRIVER_CPU}])
        return PlacementGroupFactory([{"CPU": cpu, **({"GPU": gpu} if gpu else {})}])

    return resources


def max_concurrent(trials: list[dict[str, Any]], cpu: float, gpu: float, nodes, given: int | None) -> int | None:
    """With distributed trials, at most as many trials at once as the cluster holds whole (the largest
    footprint counted): a trial whose driver runs while its workers cannot be placed would hold resources
    another trial's workers wait for (ray#54305). `given` (max_concurrent) only lowers it; `nodes()` gives
    the cluster's nodes' resources."""
    if not any(is_distributed(t) for t in trials):
        return given
    nodes = nodes()  # the Ray cluster's nodes' resources, asked only now
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    need = [footprint(t, cpu, gpu) for t in trials]
    limit = int(total_cpu // max(c for c, _ in need) + 1e-9) if max(c for c, _ in need) > 0 else len(trials)
    if max(g for _, g in need) > 0:
        limit = min(limit, int(total_gpu // max(g for _, g in need) + 1e-9))
    limit = max(1, limit)
    return min(limit, given) if given else limit


def check_groups_fit(trials: list[dict[str, Any]], nodes: list[dict[str, float]], where: str) -> None:
    """Each distributed trial's worker: on some node; its whole group plus driver: in the cluster."""
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    for t in trials:
        if not is_distributed(t):
            continue
        w = t["workers"]
        if not any(n.get("CPU", 0) >= w["cpu"] and n.get("GPU", 0) >= w["gpu"] for n in nodes):
            raise UsageError(f"workers.cpu={w['cpu']:g}, workers.gpu={w['gpu']:g}: no node of {where} has that "
                             f"much for one worker; lower workers.cpu / workers.gpu")
        cpu, gpu = footprint(t, 0, 0)
        if cpu > total_cpu + 1e-9 or gpu > total_gpu + 1e-9:
            raise UsageError(f"workers: {w['count']} x (cpu={w['cpu']:g}, gpu={w['gpu']:g}) plus the trial's driver "
                             f"({DRIVER_CPU:g} CPU) is more than {where} has ({total_cpu:g} CPUs, {total_gpu:g} "
                             f"GPUs); lower workers.count, workers.cpu or workers.gpu")
