"""One small registry: name -> factory + parameter model, plus named presets (data, not code)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
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
            raise UsageError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.all_names())}")
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
            raise ConfigError(describe_validation_error(err, prefix=where or self.kind)) from None

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


def describe_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line naming the dotted field, the bad value and what is allowed (first error only)."""
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    field_name = ".".join(p for p in (prefix, loc) if p)
    if first["type"] == "extra_forbidden":
        return f"unknown field {field_name!r}"
    value = first.get("input")
    msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{field_name or 'config'}: {msg}, got {value!r}{more}"


# The three registries every component plugs into. Importing the packages below fills them.
BACKBONES = Registry("backbone")
DATASETS = Registry("dataset")
METHODS = Registry("method")

_COMPONENT_MODULES = ("bench.backbones", "bench.data", "methods")


def load_all() -> None:
    """Import every module that registers components (idempotent)."""
    for module in _COMPONENT_MODULES:
        importlib.import_module(module)
