"""The command line made from the config dataclasses: an option per field, and a refusal of
a field's value turned into click's error for that option. Imports neither torch nor mlflow."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from .config import ConfigError, flag, value_type
from .recipes import CUDA_RECIPES, RECIPES

Command = Callable[..., Any]

_RECIPE_FIELDS = frozenset(next(iter(RECIPES.values())))
_FROM_RECIPE = "  [default: the model's recipe]"
_CLICK_TYPES: dict[type, click.ParamType] = {
    int: click.INT,
    float: click.FLOAT,
    str: click.STRING,
    bool: click.BOOL,
}
# `mlflow run` hands on parameters it does not declare as `--batch_size 256`.
MLPROJECT_SPELLING = {"token_normalize_func": lambda name: name.replace("_", "-")}


class OrEmpty(click.ParamType):
    """A value of `inner`, or empty for "not given": MLproject passes unset parameters as ""."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        self.name = inner.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "":
            return None
        return self.inner.convert(value, param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return self.inner.get_metavar(param, ctx)


def options_of(config_class: type) -> Callable[[Command], Command]:
    """One option per field of `config_class`, in the fields' order, with its default, help
    and choices. A bool is a switch: `--name/--no-name` for people, `--name true|false` for
    MLproject parameters."""

    def decorate(command: Command) -> Command:
        for config_field in reversed(dataclasses.fields(config_class)):
            name, meta = config_field.name, config_field.metadata
            switch: dict[str, Any] = {}
            if value_type(name, config_class) is bool:
                command = _with_no_flag(name, command)
                switch = {"is_flag": False, "flag_value": True}
            command = click.option(
                flag(name),
                name,
                type=_click_type(config_field, config_class),
                default=config_field.default,
                show_default=config_field.default is not None,
                metavar=meta["metavar"],
                help=meta["help"] + (_FROM_RECIPE if name in _RECIPE_FIELDS else ""),
                **switch,
            )(command)
        return command

    return decorate


def _click_type(config_field: dataclasses.Field[Any], config_class: type) -> click.ParamType:
    """Click's type for a field: its choices, or its value type; one that may be None (and
    any bool, as MLproject passes them) also takes "" for "not given"."""
    name, choices = config_field.name, config_field.metadata["choices"]
    kind: click.ParamType = (
        click.Choice(choices) if choices else _CLICK_TYPES[value_type(name, config_class)]
    )
    optional = config_field.default is None
    return OrEmpty(kind) if optional or value_type(name, config_class) is bool else kind


def _with_no_flag(name: str, command: Command) -> Command:
    """`--no-name`, the same as `--name false`."""

    @functools.wraps(command)
    def merged(*args: Any, **options: Any) -> Any:
        if options.pop(f"no_{name}"):
            options[name] = False
        return command(*args, **options)

    same = f"Same as {flag(name)} false."
    return click.option(flag(f"no_{name}"), f"no_{name}", is_flag=True, help=same)(merged)


def recipes_epilog() -> str:
    def settings(recipe: dict[str, Any]) -> str:
        return ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in recipe.items()
        )

    lines = ["\b", "Recipes (what unset options become, per --model):"]
    lines += [f"  {model}: {settings(recipe)}" for model, recipe in RECIPES.items()]
    lines += [f"  {model} on cuda: {settings(recipe)}" for model, recipe in CUDA_RECIPES.items()]
    return "\n".join(lines)


def given(context: click.Context, name: str) -> bool:
    """Whether option `name` (or its --no- twin) was given rather than left at its default."""
    sources = (context.get_parameter_source(n) for n in (name, f"no_{name}"))
    return any(s not in (None, click.core.ParameterSource.DEFAULT) for s in sources)


@contextmanager
def refusals_as_option_errors() -> Iterator[None]:
    """A refused value becomes click's one-line error for the option it came from (exit
    status 2): a field's by ConfigError, and the inputs each loader checks by its own error."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .engine import DeviceUnavailable
    from .search_space import SpaceError

    option_of: dict[type[Exception], str] = {
        CheckpointError: "checkpoint_dir",
        DataError: "data",
        DeviceUnavailable: "device",
        SpaceError: "space",
    }
    try:
        yield
    except ConfigError as error:
        raise click.BadParameter(error.message, param_hint=hint(error.field)) from None
    except tuple(option_of) as error:
        name = next(option_of[kind] for kind in type(error).__mro__ if kind in option_of)
        raise click.BadParameter(str(error), param_hint=hint(name)) from None


def hint(field_name: str) -> str:
    return f"'{flag(field_name)}'"
