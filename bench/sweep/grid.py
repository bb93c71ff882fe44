"""A sweep's jobs: every grid point x seed as a validated trial dict with a label, search values drawn from a
seeded stream, and the names that tie a job to its trial folder and the live table's columns."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import re
from typing import Any

from bench.config import SweepConfig, set_path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value, separators=(",", ":")).strip('"')


def _component_label(axis: str, value: dict[str, Any], values: list[Any]) -> str:
    """A component given whole on a grid axis, named in a label: `method=l2w`; when other values of the axis
    share its name, by the options that tell them apart (`exit_weights=[0.5,1]`; the one that sets none of them
    keeps `method=uniform`)."""
    same = [v for v in values if isinstance(v, dict) and v.get("name") == value.get("name")]
    keys = [k for k in dict.fromkeys(k for v in same for k in v if k != "name")
            if len({json.dumps(v.get(k), sort_keys=True) for v in same}) > 1]
    given = [f"{k}={_short(value[k])}" for k in keys if k in value]
    return ",".join(given) if len(same) > 1 and given else f"{axis}={value.get('name')}"


def grid_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every grid point x seed as a validated, fully defaulted trial dict with a label that names the point:
    method-dataset-backbone, then each varied axis (`lr=0.1`; a section given whole by its name, `method=l2w`,
    or by the options that tell it from others of its name, `exit_weights=[0.5,1]`), then the seed."""
    combos = [dict(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())]
    points = []
    for index, cfg in enumerate(sweep.trials()):
        combo = combos[index // len(sweep.seeds)]
        raw = cfg.model_dump()  # python mode: JSON mode would turn inf (e.g. data.noise) into null
        raw["progress"] = False  # no tqdm bars inside Ray workers
        # The thread count is part of the result (float sums round per thread split): fixed and recorded, so
        # `exitbench train` of a trial's config.yaml gives its numbers again.
        cpus = raw["workers"]["cpu"] if raw["workers"]["count"] > 1 else sweep.resources.cpu  # per process
        raw["threads"] = raw["threads"] or max(1, int(cpus))
        varied = [_component_label(path.rsplit('.', 1)[-1], value, sweep.grid[path]) if isinstance(value, dict)
                  else f"{path.rsplit('.', 1)[-1]}={_short(value)}"
                  for path, value in combo.items() if len(sweep.grid[path]) > 1]
        label = "-".join([raw["method"]["name"], raw["data"]["name"], raw["backbone"]["name"], *varied,
                          f"s{raw['seed']}"])
        points.append({"index": index, "label": label, "trial": raw})
    return points


def _sample(dist: dict[str, list[Any]], rng: random.Random) -> Any:
    kind, args = next(iter(dist.items()))
    if kind == "choice":
        return copy.deepcopy(rng.choice(args))
    if kind == "randint":
        return rng.randrange(args[0], args[1])
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
    return rng.uniform(args[0], args[1])


def expand(sweep: SweepConfig, uid: str) -> list[dict[str, Any]]:
    """The sweep's jobs: every grid point x seed x search sample, with its search values drawn here (a seeded
    stream, so the jobs are a pure function of the sweep) and a key `<uid>_<NNNNN>` that names its trial in the
    store and its trial folder for good, whichever driver runs it."""
    rng = random.Random(0)
    jobs = []
    for point in grid_points(sweep):
        for _ in range(sweep.search.num_samples):
            raw = copy.deepcopy(point["trial"])
            label = point["label"]
            for path, dist in sweep.search.space.items():
                value = _sample(dist, rng)
                set_path(raw, path, value)
                label = label.rsplit("-s", 1)[0] + f"-{path.rsplit('.', 1)[-1]}={_short(value)}-s{raw['seed']}"
            jobs.append({"key": f"{uid}_{len(jobs):05d}", "label": label, "trial": raw})
    return jobs


def trial_dict(tune_config: dict[str, Any]) -> dict[str, Any]:
    """The trial dict of a Tune config (its job's)."""
    return copy.deepcopy(tune_config["point"]["trial"])


def trial_dirname(job: dict[str, Any]) -> str:
    label = re.sub(r"[^A-Za-z0-9._=,-]+", "-", job.get("label", "trial"))
    return f"{job['key']}_{label}"[:100]


def varied_columns(sweep: SweepConfig) -> dict[str, str]:
    """The live table's parameter columns: what the grid varies (a component axis shows its name and the
    options its values spell out), the seed, and the searched fields; never a component's untouched defaults."""
    columns: dict[str, str] = {}
    for path, values in sweep.grid.items():
        keys = [path]
        if all(isinstance(v, (dict, str)) for v in values) and path.split(".")[-1] in ("data", "backbone", "method"):
            given = [v if isinstance(v, dict) else {"name": v} for v in values]
            keys = [f"{path}.{k}" for k in dict.fromkeys(k for v in given for k in v)
                    if len({json.dumps(v.get(k), sort_keys=True) for v in given}) > 1]
        for key in keys:
            columns["point/trial/" + key.replace(".", "/")] = key
    if len(sweep.seeds) > 1 or not columns:
        columns["point/trial/seed"] = "seed"
    for path in sweep.search.space:  # drawn into each job's trial dict (see expand)
        columns["point/trial/" + path.replace(".", "/")] = path
    return columns
