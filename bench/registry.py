"""One small registry: name -> factory + parameter model, plus named presets (data, not code)."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from bench.errors import ConfigError, UsageError


class Params(BaseModel):
    """Base for every component's parameter model: unknown keys are errors, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def dashed_ints(value: Any) -> Any:
    """The reference command lines spell factor lists "1-2-4"; accept that as well as a list."""
    if isinstance(value, str):
        try:
            return [int(part) for part in value.split("-")]
        except ValueError:
            raise ValueError(f"expected integers joined by '-' such as '1-2-4', got {value!r}") from None
    return value


class NoParams(Params):
    pass


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    params: type[BaseModel]
    doc: str = ""


@dataclass
class Preset:
    name: str
    base: str
    values: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


class Registry:
    """Maps names to factories. `build(name, params, **context)` validates params, then calls the factory."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._presets: dict[str, Preset] = {}

    def register(self, name: str, params: type[BaseModel] = NoParams, doc: str | None = None):
        def decorator(factory):
            if name in self._entries or name in self._presets:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            text = doc if doc is not None else (factory.__doc__ or "").strip().splitlines()[0:1]
            self._entries[name] = Entry(name, factory, params, text if isinstance(text, str) else "".join(text))
            return factory

        return decorator

    def add_preset(self, name: str, base: str, /, doc: str = "", **values: Any) -> None:
        if name in self._entries or name in self._presets:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._presets[name] = Preset(name, base, values, doc)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def presets(self, base: str | None = None) -> list[str]:
        return sorted(p for p, v in self._presets.items() if base is None or v.base == base)

    def preset(self, name: str) -> Preset:
        return self._presets[name]

    def all_names(self) -> list[str]:
        return sorted([*self._entries, *self._presets])

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._presets

    def get(self, name: str) -> Entry:
        """The entry behind a name or preset name; an unknown name lists the valid ones."""
        if name in self._presets:
            name = self._presets[name].base
        if name not in self._entries:
            raise UsageError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.all_names())}; "
                             f"valid: {', '.join(self.all_names())}")
        return self._entries[name]

    def params(self, name: str, values: dict[str, Any] | BaseModel | None = None, where: str = "") -> BaseModel:
        """Validated, fully defaulted parameters for `name` (a preset's values under the user's)."""
        entry = self.get(name)
        if isinstance(values, entry.params):
            return values
        merged = dict(self._presets[name].values) if name in self._presets else {}
        if isinstance(values, BaseModel):
            values = values.model_dump()
        merged.update(values or {})
        try:
            return entry.params.model_validate(merged)
        except ValidationError as err:
            raise ConfigError(describe_validation_error(err, prefix=where or self.kind, model=entry.params)) from None

    def build(self, name: str, values: dict[str, Any] | BaseModel | None = None, **context: Any) -> Any:
        entry = self.get(name)
        return entry.factory(self.params(name, values), **context)

    def describe(self) -> list[dict[str, Any]]:
        """Every entry with its parameters and defaults, for `exitbench list`."""
        rows = []
        for name in self.names():
            entry = self._entries[name]
            rows.append(
                {
                    "name": name,
                    "doc": entry.doc,
                    "params": defaults_of(entry.params),
                    "presets": {p: self._presets[p].values for p in self.presets(name)},
                }
            )
        return rows


def defaults_of(model: type[BaseModel]) -> dict[str, Any]:
    out = {}
    for key, info in model.model_fields.items():
        out[key] = None if info.is_required() else info.get_default(call_default_factory=True)
    return out


def did_you_mean(word: str, choices: list[str]) -> str:
    """" (did you mean 'x'?)" for the closest of `choices` (difflib), or ""."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the (nested) pydantic model at `loc` inside `model`; [] where it is not a model."""
    for part in loc:
        info = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        ann = info.annotation if info is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def describe_validation_error(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One line naming the dotted field, the bad value and what is allowed (first error only); an unknown
    field gets the closest valid name of `model`'s fields at that place."""
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    field_name = ".".join(p for p in (prefix, loc) if p)
    if first["type"] == "extra_forbidden":
        parts = tuple(p for p in first["loc"] if p != "__root__")
        hint = did_you_mean(str(parts[-1]), _fields_at(model, parts[:-1])) if parts else ""
        return f"unknown field {field_name!r}{hint}"
    value = first.get("input")
    msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{field_name or 'config'}: {msg}, got {value!r}{more}"


# The three registries every component plugs into. Importing the packages below fills them.
BACKBONES = Registry("backbone")
DATASETS = Registry("dataset")
METHODS = Registry("method")

_COMPONENT_MODULES = ("bench.backbones", "bench.datasets", "methods")

# Out-of-tree components: an installed package declares an entry point in one of these groups (its module
# registers with the decorators above when imported), or a file/folder is named with `--include PATH`.
ENTRY_POINT_GROUPS = ("exitbench.methods", "exitbench.backbones", "exitbench.datasets")
_entry_points_loaded = False
_included: list[str] = []  # absolute paths given to include(), in order (Ray trials import them again)


def load_all() -> None:
    """Import every module that registers components, then the installed plugins (idempotent)."""
    for module in _COMPONENT_MODULES:
        importlib.import_module(module)
    load_entry_points()


def load_entry_points() -> None:
    """Import the module of every `exitbench.*` entry point of the installed distributions (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for group in ENTRY_POINT_GROUPS:
        for ep in entry_points(group=group):
            _import_plugin(ep.load, f"plugin {ep.name!r} (entry point {group}: {ep.value})")


def included() -> list[str]:
    return list(_included)


def include(paths: list[str]) -> None:
    """Import a .py file, or every .py file of a folder (name order, `_*` skipped), so that the components they
    register exist; the folder (or the file's folder) goes on sys.path for their own imports."""
    for given in paths:
        path = Path(given).expanduser().resolve()
        if str(path) in _included:
            continue
        if path.is_dir():
            files = sorted(f for f in path.glob("*.py") if not f.name.startswith("_"))
            folder = path
            if not files:  # a typo'd folder would otherwise load nothing, silently
                raise UsageError(f"--include {given}: the folder holds no .py file (other than _*.py); give a "
                                 f"Python file that registers components or a folder of them")
        elif path.is_file() and path.suffix == ".py":
            files, folder = [path], path.parent
        else:
            what = "is not a .py file" if path.exists() else "no such .py file or folder"
            raise UsageError(f"--include {given}: {what}; give a Python file that registers "
                             f"components or a folder of them")
        _included.append(str(path))
        for module in _COMPONENT_MODULES:  # built-ins first, so that a clash of names blames the plugin
            importlib.import_module(module)
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
        for file in files:
            _import_plugin(lambda file=file: _import_file(file), f"--include {file}")


def _import_file(file: Path) -> None:
    name = file.stem  # its own name, so that other plugins can import it
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) == str(file):
            return
        raise UsageError(f"--include {file}: a module named {name!r} is loaded already (from "
                         f"{getattr(loaded, '__file__', None) or 'built-in'}); rename the file")
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _import_plugin(load: Callable[[], Any], what: str) -> None:
    try:
        load()
    except UsageError:
        raise
    except Exception as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise UsageError(f"{what} failed to load: {type(err).__name__}: {lines[0] if lines else ''}") from None
