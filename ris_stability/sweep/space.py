"""Search-space files: which parameters a sweep varies, and how.

A space file is TOML with one table per parameter: a name of the command template (``{lr}`` in ``--
python train.py --lr {lr}``) or, for a config sweep, the config's dotted key::

    [params.lr]             # a script sweep's {lr}; a config sweep's keys are dotted: [params."train.lr"]
    type = "float"          # float | int | categorical
    low = 1e-4
    high = 1e-2
    log = true              # float / int: sample on a log scale (low > 0)

    [params."model.activation"]
    type = "categorical"
    choices = ["gelu", "relu"]

``step`` (float / int) quantises a range. The file is checked on its own (types, bounds, choices); a
config sweep also checks it against the config by the target's ``check(key, value)`` for every bound and choice, so an unknown key or an
invalid value fails with the same message as ``--set key=value``, before any trial runs.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ris_stability.records import UsageError

TYPES = ("float", "int", "categorical")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_FIELDS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
           "categorical": {"type", "choices"}}


class SpaceError(UsageError):
    """A search-space file is unreadable or one of its parameters is invalid (the message names the key)."""


@dataclass(frozen=True)
class Param:
    """One swept config key."""

    key: str
    kind: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value of this parameter for an Optuna trial (its sampler decides)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def probe_values(self) -> list[Any]:
        """The values checked against the config: both bounds, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "categorical":
            return "{" + ", ".join(repr(c) for c in self.choices) + "}"
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "") + (f" step {self.step:g}" if self.step else "")


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    source: str = ""

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {p.key: p.suggest(trial) for p in self.params}

    def check(self, check_value: Callable[[str, Any], None]) -> None:
        """Validate every bound and choice against the config; ``check_value`` raises UsageError."""
        for p in self.params:
            for value in p.probe_values():
                try:
                    check_value(p.key, value)
                except UsageError as err:
                    raise SpaceError(f"space file {self.source}: parameter {p.key!r} = {value!r} is rejected by the "
                                     f"config: {err}") from None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data (stored with the study, so a joining worker can check it runs the same space)."""
        out: dict[str, dict[str, Any]] = {}
        for p in self.params:
            d: dict[str, Any] = {"type": p.kind}
            if p.kind == "categorical":
                d["choices"] = list(p.choices)
            else:
                d.update(low=p.low, high=p.high, log=p.log, **({"step": p.step} if p.step else {}))
            out[p.key] = d
        return out


def _number(source: str, key: str, spec: Mapping[str, Any], name: str, kind: str) -> float | int:
    if name not in spec:
        raise SpaceError(f"space file {source}: parameter {key!r} ({kind}) has no {name!r}; add e.g. {name} = 0.1")
    v = spec[name]
    ok = isinstance(v, int) if kind == "int" else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v)):
        want = "an integer" if kind == "int" else "a finite number"
        raise SpaceError(f"space file {source}: parameter {key!r}: {name} = {v!r} must be {want}")
    return v


def _range_param(source: str, key: str, spec: Mapping[str, Any], kind: str) -> Param:
    low, high = _number(source, key, spec, "low", kind), _number(source, key, spec, "high", kind)
    log = spec.get("log", False)
    step = _number(source, key, spec, "step", kind) if "step" in spec else None
    if not isinstance(log, bool):
        raise SpaceError(f"space file {source}: parameter {key!r}: log = {log!r} must be true or false")
    if low > high:
        raise SpaceError(f"space file {source}: parameter {key!r}: low = {low!r} > high = {high!r} (bounds reversed?)")
    if log and low <= 0:
        raise SpaceError(f"space file {source}: parameter {key!r}: log = true needs low > 0, got low = {low!r}")
    if step is not None and (step <= 0 or log):
        raise SpaceError(f"space file {source}: parameter {key!r}: step = {step!r} must be > 0 and cannot be "
                         "combined with log = true")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _param(source: str, key: str, spec: Any) -> Param:
    if not isinstance(spec, dict):
        raise SpaceError(f"space file {source}: parameter {key!r} must be a table ([params.\"{key}\"]), got {spec!r}")
    if not _KEY.match(key):
        raise SpaceError(f"space file {source}: parameter {key!r} is not a name (letters, digits, '_', '.', '-'; e.g. "
                         "lr for a command's {lr}, train.lr for a config key)")
    kind = spec.get("type")
    if kind not in TYPES:
        raise SpaceError(f"space file {source}: parameter {key!r}: type = {kind!r}; valid types: {', '.join(TYPES)}")
    unknown = sorted(set(spec) - _FIELDS[kind])
    if unknown:
        raise SpaceError(f"space file {source}: parameter {key!r}: unknown field {unknown[0]!r} for type {kind!r}; "
                         f"valid fields: {', '.join(sorted(_FIELDS[kind]))}")
    if kind != "categorical":
        return _range_param(source, key, spec, kind)
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"space file {source}: parameter {key!r}: choices must be a non-empty list, got {choices!r}")
    if len(set(map(repr, choices))) != len(choices):
        raise SpaceError(f"space file {source}: parameter {key!r}: choices {choices!r} repeat a value")
    if any(not isinstance(c, (str, int, float, bool)) for c in choices):
        raise SpaceError(f"space file {source}: parameter {key!r}: choices must be strings, numbers or booleans")
    return Param(key, kind, choices=tuple(choices))


def parse_space(data: Mapping[str, Any], source: str = "<space>") -> SearchSpace:
    extra = sorted(set(data) - {"params"})
    if extra:
        raise SpaceError(f"space file {source}: unknown top-level key {extra[0]!r}; parameters go in "
                         "[params.\"section.key\"] tables")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"space file {source}: no parameters; add e.g. [params.\"train.lr\"] with type, low, high")
    return SearchSpace(tuple(_param(source, key, spec) for key, spec in params.items()), source)


def load_space(path: str | Path) -> SearchSpace:
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"space file {str(p)!r} does not exist; see configs/space-quickstart.toml for an example")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SpaceError(f"space file {str(p)!r} is not valid TOML: {err}") from None
    return parse_space(data, str(p))


def override_text(key: str, value: Any) -> str:
    """``key=value`` with the value as a TOML literal (the form ``--set`` takes)."""
    if isinstance(value, bool):
        literal = "true" if value else "false"
    elif isinstance(value, str):
        literal = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        literal = repr(value)
    return f"{key}={literal}"
