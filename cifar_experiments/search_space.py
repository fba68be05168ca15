"""What a sweep searches: training options and their ranges, from a YAML file or a model's
default space. Imports neither torch nor mlflow, so a bad file is refused at once.

A space file maps option names to a range or a list of choices:

    lr: {low: 0.01, high: 0.3, log: true}   # a float range, sampled on a log scale
    weight_decay: {low: 1.0e-4, high: 1.0e-2, log: true}
    label_smoothing: {low: 0.0, high: 0.2}
    batch_size: [64, 128, 256]               # choices
    seed: {low: 0, high: 4}                  # an integer option takes an integer range
    schedule: [onecycle, cosine]

A range may also take `step` (its grid spacing). Integer options (batch_size, seed) sample
integers; `nesterov`, `lookahead`, `augment`, `schedule` and `keep_epoch` take choices only.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from .config import ConfigError, check_value, field_choices, value_type

# The training options a sweep may search; the others (data, epochs, device, ...) are the
# sweep's own settings or fixed for every trial. val_fraction is not among them: trials on
# different validation splits could not be compared.
SEARCHABLE = (
    "batch_size", "lr", "momentum", "nesterov", "weight_decay", "label_smoothing",
    "schedule", "lookahead", "augment", "keep_epoch", "seed",
)  # fmt: skip

# What each model searches unless a space file says otherwise: around its recipe
# (recipes.RECIPES), over the options that moved validation accuracy most when tuned by hand.
DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    "tutorial": {
        "lr": {"low": 0.03, "high": 0.2, "log": True},
        "batch_size": [64, 128, 256],
        "weight_decay": {"low": 1e-4, "high": 3e-3, "log": True},
        "momentum": {"low": 0.8, "high": 0.95},
    },
    "airbench": {
        "lr": {"low": 0.3, "high": 1.5, "log": True},
        "weight_decay": {"low": 5e-4, "high": 4e-3, "log": True},
        "label_smoothing": {"low": 0.0, "high": 0.3},
    },
}


class SpaceError(ValueError):
    """The space cannot be searched; the message names the file and the key."""


class Trial(Protocol):
    """The part of `optuna.Trial` a dimension uses."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: Any, log: bool
    ) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int, log: bool) -> int: ...

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any: ...


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, name: str, trial: Trial) -> Any:
        if self.integer:
            step = int(self.step or 1)
            return trial.suggest_int(name, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[Any]:
        """Every value a grid visits: integer ranges, and ranges with a step."""
        if not (self.integer or self.step):
            raise ValueError("a float range without a step has no grid; give it a step or a list")
        step = self.step or 1
        count = round((self.high - self.low) / step) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.integer else [float(f"{v:.12g}") for v in values]

    def holds(self, value: Any) -> bool:
        on_grid = self.step is None or math.isclose((value - self.low) / self.step % 1, 0)
        return self.low <= value <= self.high and on_grid

    def describe(self) -> str:
        return f"{self.low} to {self.high}" + (" (log)" if self.log else "")


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]

    def suggest(self, name: str, trial: Trial) -> Any:
        return trial.suggest_categorical(name, list(self.values))

    def grid(self) -> list[Any]:
        return list(self.values)

    def holds(self, value: Any) -> bool:
        return value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


Dimension = Range | Choice
Space = dict[str, Dimension]


def load(path: str | None, model: str, leave_out: Collection[str] = ()) -> Space:
    """The space in the YAML file at `path`, or `model`'s default space without the options
    in `leave_out` (those fixed for every trial)."""
    if path is None:
        default = {k: v for k, v in DEFAULT_SPACES[model].items() if k not in leave_out}
        if not default:
            raise SpaceError(f"every option of {model}'s default space is fixed; give a space")
        return parse(default, f"the default space of {model}")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise SpaceError(f"{path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise SpaceError(f"{path}: not valid YAML: {_one_line(error)}") from None
    return parse(raw, path)


def parse(raw: Any, where: str) -> Space:
    """Check a space written as plain data (YAML's) and give its dimensions."""
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{where}: must map option names to a range or a list of choices")
    unknown = sorted(str(name) for name in raw if name not in SEARCHABLE)
    if unknown:
        raise SpaceError(
            f"{where}: cannot search {', '.join(unknown)}; searchable options: "
            f"{', '.join(SEARCHABLE)}"
        )
    return {name: _dimension(name, spec, f"{where}: {name}") for name, spec in raw.items()}


def grid(space: Space) -> dict[str, list[Any]]:
    """Every dimension's values, for a grid search."""
    try:
        return {name: dimension.grid() for name, dimension in space.items()}
    except ValueError as error:
        name = next(n for n, d in space.items() if isinstance(d, Range) and not _has_grid(d))
        raise SpaceError(f"grid search: {name}: {error}") from None


def _has_grid(dimension: Range) -> bool:
    return dimension.integer or dimension.step is not None


def _dimension(name: str, spec: Any, where: str) -> Dimension:
    kind = value_type(name)
    if isinstance(spec, list):
        if not spec:
            raise SpaceError(f"{where}: the list of choices is empty")
        values = tuple(_typed(value, kind, name, where) for value in spec)
        if len(set(values)) != len(values):
            raise SpaceError(f"{where}: the choices repeat a value")
        return Choice(values)
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: give a list of choices or {{low, high}} (with log, step)")
    if kind not in (int, float):
        raise SpaceError(f"{where}: takes a list of choices, not a range")
    extra = sorted(set(spec) - {"low", "high", "log", "step"})
    if extra:
        raise SpaceError(
            f"{where}: unknown key {', '.join(map(str, extra))} (low, high, log, step)"
        )
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(f"{where}: the range has no {key}")
    low, high = (_typed(spec[key], kind, name, f"{where}.{key}") for key in ("low", "high"))
    if not low < high:
        raise SpaceError(f"{where}: the range is empty: low {low} is not below high {high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}.log: must be true or false, got {log!r}")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log range needs low above 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _typed(step, kind, name, f"{where}.step")
        if not 0 < step <= high - low:
            raise SpaceError(f"{where}.step: must be above 0 and at most high - low, got {step}")
        if log:
            raise SpaceError(f"{where}: a range takes log or step, not both")
    return Range(low, high, log, step, integer=kind is int)


def _typed(value: Any, kind: type, name: str, where: str) -> Any:
    """`value` as the option's type, checked against its choices, or a SpaceError."""
    valid = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, int | float) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, str)
    )
    if not valid:
        raise SpaceError(f"{where}: {value!r} is not {_KIND_NAMES[kind]}")
    choices = field_choices(name)
    if choices and value not in choices:
        raise SpaceError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    try:
        check_value(name, kind(value))
    except ConfigError as error:
        raise SpaceError(f"{where}: {error.message}") from None
    return kind(value)


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
