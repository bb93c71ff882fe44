"""Validated configuration: TrialConfig (one training run) and SweepConfig (a grid of them).

Components (dataset, backbone, method) are sections `{name: ..., <params>}`; each component declares
its own parameter model next to its code, so adding one never touches this file.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench.errors import ConfigError, UsageError
from bench.registry import BACKBONES, DATASETS, METHODS, Registry, describe_validation_error, did_you_mean, load_all


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimConfig(Section):
    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    nesterov: bool = False


class ScheduleConfig(Section):
    """LR schedule. multistep: x`gamma` at the given fractions of training (MSDNet: 0.5, 0.75).
    cosine: per-iteration cosine to zero (L2W). Optional linear warm-up over `warmup_epochs`."""

    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or v != sorted(v):
            raise ValueError("milestones must be increasing fractions of training in (0, 1)")
        return v


class EvalConfig(Section):
    confidence: Literal["max_softmax", "entropy", "margin"] = "max_softmax"


class InitConfig(Section):
    """Start training from saved weights: an exitbench checkpoint or a reference project's file (MSDNet-PyTorch,
    L2W-DEN, RANet-pytorch, IMTA; see bench.backbones.checkpoint). The model's weights, and the l2w WPN when
    the file has one. strict: every key and shape must match; false loads those that do (e.g. new heads)."""

    checkpoint: str
    strict: bool = True


class RegimeConfig(Section):
    """Training regime (Kubaty et al. 2024; SDN's IC-only), run by bench/regime.py. joint: the strategy trains
    everything throughout. disjoint / mixed: phase 1 (`phase1` of the epochs) trains the backbone with the
    last exit only; phase 2 trains the earlier exits' heads on the frozen backbone (disjoint) or everything
    (mixed) with the strategy."""

    name: Literal["joint", "disjoint", "mixed"] = "joint"
    phase1: float = Field(0.5, gt=0, lt=1, description="fraction of the epochs in phase 1 (disjoint, mixed)")

    def phase1_epochs(self, epochs: int) -> int:
        """round(phase1 * epochs), at least one epoch in each phase; 0 for joint."""
        return 0 if self.name == "joint" else min(epochs - 1, max(1, round(self.phase1 * epochs)))


class WorkersConfig(Section):
    """One trial on several workers: Ray Train's TorchTrainer runs `count` DDP processes (bench/distributed.py),
    each with `cpu` CPUs and `gpu` GPUs (nccl on GPUs, gloo on CPUs). `batch_size` stays the global batch: each
    worker trains on batch_size / count per step. count 1 is one process (no Ray Train, no DDP). sync_bn: BatchNorm
    statistics over the global batch (torch SyncBatchNorm) instead of each worker's own, as DDP has by default."""

    count: int = Field(1, ge=1, description="DDP workers of this trial (1: one process)")
    cpu: float = Field(1.0, gt=0, description="CPUs per worker")
    gpu: float = Field(0.0, ge=0, description="GPUs per worker (0: gloo on CPUs)")
    sync_bn: bool = Field(False, description="SyncBatchNorm across the workers (count > 1)")


def _component(registry: Registry, section: str, value: Any) -> dict[str, Any]:
    """Validate a `{name, **params}` section against the registry; return it fully defaulted."""
    load_all()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{section}: expected a mapping with a 'name' key, got {value!r}")
    values = dict(value)
    name = values.pop("name")
    if not isinstance(name, str) or name not in registry:
        hint = did_you_mean(name, registry.all_names()) if isinstance(name, str) else ""
        raise ConfigError(f"{section}.name: unknown {registry.kind} {name!r}{hint}; "
                          f"valid: {', '.join(registry.all_names())}")
    params = registry.params(name, values, where=section)
    return {"name": name, **params.model_dump(mode="json")}


class TrialConfig(Section):
    """Everything one training run needs. `exitbench config show` prints it fully defaulted."""

    name: str = "trial"
    data: dict[str, Any] = Field(default_factory=lambda: {"name": "digits"})
    backbone: dict[str, Any] = Field(default_factory=lambda: {"name": "tiny"})
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "uniform"})
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    regime: RegimeConfig = Field(default_factory=RegimeConfig)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = Field(0, ge=0)
    device: str = "auto"
    amp: bool = False
    deterministic: bool = False
    # torch's intra-op threads. Float sums split over threads round differently, so the same seed gives the
    # same numbers only at the same thread count; None = torch's default (all cores). Sweeps set resources.cpu.
    threads: int | None = Field(None, ge=1)
    progress: bool = True
    out_dir: str = "runs/train"
    init: InitConfig | None = None  # weights to start from (fine-tuning); null: fresh initialisation
    workers: WorkersConfig = Field(default_factory=WorkersConfig)

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, v: Any) -> dict[str, Any]:
        return _component(DATASETS, "data", v)

    @field_validator("backbone", mode="before")
    @classmethod
    def _backbone(cls, v: Any) -> dict[str, Any]:
        return _component(BACKBONES, "backbone", v)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> dict[str, Any]:
        return _component(METHODS, "method", v)

    @field_validator("regime", mode="before")
    @classmethod
    def _regime(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v  # `regime: mixed` (a grid axis of names)

    @model_validator(mode="after")
    def _two_phases(self) -> TrialConfig:
        if self.regime.name != "joint" and self.epochs < 2:
            raise ConfigError(f"regime.name: {self.regime.name} has two phases and needs epochs >= 2, "
                              f"got epochs={self.epochs}")
        return self

    @model_validator(mode="after")
    def _workers(self) -> TrialConfig:
        n = self.workers.count
        if n > 1:
            if self.batch_size % n:
                raise ConfigError(f"batch_size={self.batch_size} is the global batch and must split evenly over "
                                  f"workers.count={n} (each worker gets batch_size / count); use e.g. "
                                  f"batch_size={max(n, self.batch_size // n * n)}")
            load_all()
            method = self.method["name"]
            supported = [name for name in METHODS.all_names()
                         if getattr(METHODS.get(name).factory, "distributed", False)]
            if method not in supported:
                raise ConfigError(f"method {method!r} does not run on several workers (its strategy does not set "
                                  f"`distributed = True`, which says its update under DDP is made exact); with "
                                  f"workers.count > 1 use one of {', '.join(supported)}, or workers.count=1")
            if self.workers.sync_bn and (self.workers.gpu == 0 or self.device == "cpu"):
                raise ConfigError("workers.sync_bn: torch's SyncBatchNorm runs on GPUs only; give each worker a GPU "
                                  "(workers.gpu=1) or set workers.sync_bn=false")
            refused = getattr(METHODS.get(method).factory, "sync_bn_refused", None)
            if self.workers.sync_bn and refused:
                raise ConfigError(f"workers.sync_bn: method {method!r} {refused}; set workers.sync_bn=false")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_components(cls, values: Any) -> Any:
        # Field defaults skip "before" validators; run them so defaults are fully expanded too.
        if isinstance(values, dict):
            for key, default in (("data", "digits"), ("backbone", "tiny"), ("method", "uniform")):
                section = values.setdefault(key, {"name": default})
                if isinstance(section, dict) and "name" not in section:  # options for the default component
                    values[key] = {"name": default, **section}
        return values

    def params(self, section: Literal["data", "backbone", "method"]) -> BaseModel:
        """The validated parameter model of a component section."""
        registry = {"data": DATASETS, "backbone": BACKBONES, "method": METHODS}[section]
        values = dict(getattr(self, section))
        return registry.params(values.pop("name"), values, where=section)


class Resources(Section):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


SPACE_KINDS = ("uniform", "loguniform", "randint", "choice")
SPACE_FORMS = "{uniform: [low, high]}, {loguniform: [low, high]}, {randint: [low, high]}, {choice: [a, b, ...]}"


class SearchConfig(Section):
    """Hyper-parameter search on top of the grid: `num_samples` samples per grid point from `space` (random
    search; without a space, plain repeats), optional ASHA early stopping on `metric`.

    space: dotted trial field -> one distribution, e.g. `optim.lr: {loguniform: [0.01, 0.5]}`,
    `batch_size: {choice: [32, 64]}`, `method.epsilon: {uniform: [0.5, 1.0]}`, `epochs: {randint: [2, 6]}`
    (randint's upper end is excluded, as in Ray Tune).
    """

    num_samples: int = Field(1, ge=1)
    space: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: str = "val_acc_last"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)

    @field_validator("space", mode="before")
    @classmethod
    def _space(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("search.space maps dotted trial fields to one distribution each, e.g. "
                             "{optim.lr: {loguniform: [0.01, 0.5]}}")
        for path, dist in v.items():
            if (not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SPACE_KINDS
                    or not isinstance(next(iter(dist.values())), list)):
                raise ValueError(f"{path}: not a distribution; accepted forms: {SPACE_FORMS}")
            kind, args = next(iter(dist.items()))
            if kind == "choice":
                if not args:
                    raise ValueError(f"{path}: choice needs at least one value")
                continue
            numbers = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            if not numbers or not args[0] < args[1]:
                raise ValueError(f"{path}: {kind} needs [low, high] numbers with low < high")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"{path}: loguniform needs low > 0")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ValueError(f"{path}: randint needs whole numbers [low, high)")
        return v

    def endpoints(self, path: str) -> list[Any]:
        """Values that bound a search dimension (each is validated on every grid point before a sweep)."""
        kind, args = next(iter(self.space[path].items()))
        if kind == "choice":
            return list(args)
        return [args[0], args[1] - 1] if kind == "randint" else list(args)


class SweepConfig(Section):
    """A base trial plus grid axes (dotted trial field -> values), seeds as an axis."""

    name: str = "sweep"
    base: TrialConfig = Field(default_factory=TrialConfig)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, ge=1)
    storage_path: str = "runs"
    search: SearchConfig = Field(default_factory=SearchConfig)
    report: dict[str, Any] | None = None  # a section, even `report: {}`, means: report after the sweep
    # Opt-in trackers through Ray Tune's callbacks, e.g. {wandb: {project: p}} or {mlflow: {tracking_uri: u}};
    # the options are those of ray.air.integrations' WandbLoggerCallback / MLflowLoggerCallback.
    loggers: dict[Literal["wandb", "mlflow"], dict[str, Any]] = Field(default_factory=dict)
    keep_checkpoints: int | None = Field(2, ge=1, description="checkpoints kept per trial, newest first (Ray Tune's "
                                         "CheckpointConfig.num_to_keep); null keeps every epoch's")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds must name at least one seed")
        if len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError("seeds must be distinct non-negative integers")
        return v

    @model_validator(mode="after")
    def _axes(self) -> SweepConfig:
        base = self.base.model_dump(mode="json")
        for path, values in self.grid.items():
            if not values:
                raise ConfigError(f"grid.{path}: empty axis; give at least one value")
            if path == "seed":
                raise ConfigError("grid.seed: seeds are an axis of their own; use the top-level 'seeds' list")
            if not _path_exists(base, path):
                raise ConfigError(f"grid.{path}: no such trial field{_close_path(base, path)} "
                                  f"(fields: {', '.join(base)})")
        for path in self.search.space:
            if path in self.grid or path == "seed":
                raise ConfigError(f"search.space.{path}: already a grid axis or the seed; search it in one place only")
            if not _path_exists(base, path):
                raise ConfigError(f"search.space.{path}: no such trial field{_close_path(base, path)} "
                                  f"(fields: {', '.join(base)})")
        for trial in self.trials():  # every grid point must be a valid trial, before any work starts
            raw = trial.model_dump()
            for path in self.search.space:  # ... and so must the ends of every search dimension on it
                for value in self.search.endpoints(path):
                    point = copy.deepcopy(raw)
                    set_path(point, path, copy.deepcopy(value))
                    validate_trial(point, where=f"search.space.{path}={value!r}")
        return self

    @model_validator(mode="after")
    def _distinct_points(self) -> SweepConfig:
        seen: dict[str, dict[str, Any]] = {}
        for combo, trial in zip(itertools.product(*self.grid.values()), self.trials()[::len(self.seeds)]):
            point = dict(zip(self.grid, combo))
            key = trial.model_dump_json()
            if key in seen:  # the report would count the copies as seeds (std 0)
                raise ConfigError(f"grid: the points {seen[key]} and {point} are the same trial; give each value "
                                  f"of an axis once")
            seen[key] = point
        return self

    def trials(self) -> list[TrialConfig]:
        """The Cartesian product of the axes and the seeds, each a validated TrialConfig."""
        base = self.base.model_dump(mode="json")
        paths = list(self.grid)
        out = []
        for combo in itertools.product(*(self.grid[p] for p in paths)):
            raw = copy.deepcopy(base)
            for path, value in zip(paths, combo):
                set_path(raw, path, copy.deepcopy(value), replace_section=True)
            for seed in self.seeds:
                raw["seed"] = seed
                out.append(validate_trial(raw, where=f"grid point {dict(zip(paths, combo))}"))
        return out


def _path_exists(tree: dict[str, Any], path: str) -> bool:
    parts = path.split(".")
    if parts[0] in _COMPONENTS and len(parts) == 2:
        return True  # a component accepts its own parameters; validating each grid point checks them
    node: Any = tree
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


_COMPONENTS = ("data", "backbone", "method")


def _close_path(tree: dict[str, Any], path: str) -> str:
    """A did-you-mean for a dotted path: the closest key at the first level that does not exist."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict):
            return ""
        if part not in node:
            return did_you_mean(part, list(node))
        node = node[part]
    return ""


def set_path(tree: dict[str, Any], path: str, value: Any, replace_section: bool = False) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        if isinstance(node.get(part), str) and part in (*_COMPONENTS, "regime"):
            node[part] = {"name": node[part]}  # `method: l2w` is short for `method: {name: l2w}`; `regime: mixed` too
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    section = parts[:-2] in ([], ["base"])  # a component section of a trial or of a sweep's base
    renamed = node.get("name") not in (None, value)
    if last == "name" and len(parts) >= 2 and parts[-2] in _COMPONENTS and section and renamed:
        # Another component: its section starts afresh (the old one's options mean nothing to it).
        node.clear()
    if replace_section and isinstance(value, dict) and "name" in value and isinstance(node.get(last), dict):
        # A whole component given as an axis value (e.g. method: [{name: l2w, epsilon: 0.8}]).
        node[last] = value
    elif last in _COMPONENTS and parts[:-1] in ([], ["base"]) and isinstance(value, str):
        node[last] = {"name": value}  # switching component drops the old component's parameters
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` pairs; values are parsed as YAML scalars/lists (0.5, true, [1, 2], text)."""
    pairs = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise UsageError(f"override {item!r} is not of the form dotted.key=value (e.g. optim.lr=0.1)")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key, value))
    return pairs


def apply_overrides(raw: dict[str, Any], overrides: list[str], *, sweep: bool = False) -> dict[str, Any]:
    """`raw` with the dotted overrides set. A component's new name (`data.name=cifar10`, `method=l2w`) is set
    first and starts its section afresh; the section's other overrides then apply to the new component.

    For a sweep (`sweep=True`), keys that are not sweep fields are trial fields of `base` (`epochs=1` is
    `base.epochs=1`; `name` is the sweep's name, `base.name` the trials'); a field that a grid axis sets is
    refused (the axis would overwrite it): override the axis (`grid.optim.lr=[0.1]`) instead."""
    raw = copy.deepcopy(raw)
    pairs = parse_overrides(overrides)
    if sweep:
        pairs = [(k if k.split(".")[0] in SweepConfig.model_fields else f"base.{k}", v) for k, v in pairs]
        axes = raw.get("grid") if isinstance(raw.get("grid"), dict) else {}
        for key, _ in pairs:
            path = key.removeprefix("base.")
            axis = next((a for a in axes if path == a or path.startswith(a + ".")), None) if key != path else None
            if axis is not None:
                raise UsageError(f"override {path!r}: {axis!r} is a grid axis, whose values replace the base's; "
                                 f"override the axis instead, e.g. grid.{axis}=[...]")
    pairs.sort(key=lambda kv: kv[0].removeprefix("base.") not in (*_COMPONENTS, *(f"{c}.name" for c in _COMPONENTS)))
    for key, value in pairs:
        for section in ("grid.", "search.space."):  # their keys are dotted trial paths themselves
            if key.startswith(section) and len(key) > len(section):
                node = raw
                for part in section.rstrip(".").split("."):
                    node = node.setdefault(part, {})
                node[key[len(section):]] = value
                break
        else:
            set_path(raw, key, value)
    return raw


BUNDLED = Path(__file__).resolve().parent / "configs"  # the sweeps that ship with exitbench


def bundled_sweeps() -> dict[str, Path]:
    """Bundled sweep name -> its YAML (bench/configs/NAME.yaml); a sweep may be named instead of given as a path."""
    return {path.stem: path for path in sorted(BUNDLED.glob("*.yaml"))}


def describe_bundled(path: Path) -> str:
    """A bundled sweep's first comment line (each file opens with what it is)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_config(given: str | Path) -> Path:
    """A config file, or a bundled sweep's name (`default`, `l2w-ablation`, ...); a file of that name wins."""
    path = Path(given)
    if path.is_file():
        return path
    bundled = bundled_sweeps()
    name = str(given).removesuffix(".yaml")
    if name in bundled and not path.exists():
        return bundled[name]
    hint = did_you_mean(name, list(bundled)) if "/" not in str(given) else ""
    raise UsageError(f"config file {str(given)!r} does not exist{hint}; give a YAML file or a bundled sweep's name "
                     f"({', '.join(bundled)})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UsageError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping at the top level")
    return raw


def validate_trial(raw: dict[str, Any], where: str = "") -> TrialConfig:
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        msg = describe_validation_error(err, model=TrialConfig)
        raise ConfigError(f"{msg} ({where})" if where else msg) from None
    except ConfigError as err:
        raise ConfigError(f"{err} ({where})" if where else str(err)) from None


def validate_sweep(raw: dict[str, Any]) -> SweepConfig:
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, model=SweepConfig)) from None


def load_trial(path: str | Path | None, overrides: list[str] = ()) -> TrialConfig:
    raw = read_yaml(path) if path else {}
    return validate_trial(apply_overrides(raw, list(overrides)))


def is_sweep(raw: dict[str, Any]) -> bool:
    """A mapping with any field that only a sweep has (base, grid, seeds, search, loggers, ...)."""
    return any(k in raw for k in set(SweepConfig.model_fields) - set(TrialConfig.model_fields))


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    raw = read_yaml(path)
    trial_only = sorted(set(raw) & set(TrialConfig.model_fields) - set(SweepConfig.model_fields))
    if trial_only and not is_sweep(raw):
        raise UsageError(f"{str(path)!r} is a trial config ({trial_only[0]}: ...), not a sweep; run it with "
                         f"`exitbench train {path}`, or put it under `base:` with a grid")
    return validate_sweep(apply_overrides(raw, list(overrides), sweep=True))


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def split_config_arg(path: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`exitbench train k=v` has no file: argparse put the first override into the optional FILE slot."""
    if path is not None and "=" in path and not Path(path).exists():
        return None, [path, *overrides]
    return path, list(overrides)


def resolve_device(name: str):
    """The torch device a config's `device` names: auto is cuda when present; cuda asked for without it is one line."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but CUDA is not available here; use device=cpu or auto")
    return torch.device(name)
