"""What each command is asked to do, as frozen, validated dataclasses (`TrainConfig`,
`SweepConfig`, `RegisterConfig`), and the recipes unset training options take.

Each field carries its own type, help, choices and rules (does it change the training? may
it change on resume?); the command line is made from them (cli_options.py), so an option is
written once. Imports neither torch nor mlflow, so the CLI can check options before anything
heavy loads.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipes import CUDA_RECIPES, RECIPES

MODEL_NAMES = ("tutorial", "airbench")
SCHEDULES = ("onecycle", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp32")
KEEP_EPOCHS = ("best", "last")
GATES = ("significant", "better", "off")
# The registered-model alias that always names the best version so far.
CHAMPION_ALIAS = "champion"


class ConfigError(ValueError):
    """A field holds a value training cannot use; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


def option(
    help: str, default: Any, choices: tuple[str, ...] = (), metavar: str | None = None,
    *, changes_training: bool = True, may_change_on_resume: bool = False,
) -> Any:  # fmt: skip
    """A field that is also a command-line option: its type is the field's annotation.

    `changes_training`: two trainings that differ in it are not the same experiment (a
    sweep's trials must agree on it). `may_change_on_resume`: a resumed run may take a new
    value; any other option must be the run's own.
    """
    metadata = {"help": help, "choices": choices, "metavar": metavar,
                "changes_training": changes_training,
                "may_change_on_resume": may_change_on_resume}  # fmt: skip
    return field(default=default, metadata=metadata)


def _where_and_how(
    help: str, default: Any, choices: tuple[str, ...] = (), metavar: str | None = None
) -> Any:
    """An option that says where a training runs or is kept, or how it is carried out, not
    what it learns: it may change on resume, and trials may differ in it."""
    return option(help, default, choices, metavar, changes_training=False,
                  may_change_on_resume=True)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = option("Passes over the training split.", 10)
    model: str = option(
        "Network to train; it brings its own recipe for the options below.",
        "tutorial",
        MODEL_NAMES,
    )
    # Left unset (None), each option of the model's recipe takes the recipe's value as the
    # config is made (__post_init__): a config holds a value for every one of them.
    batch_size: int = option("Images per optimiser step.", None)
    lr: float = option("Peak learning rate of SGD.", None)
    momentum: float = option("SGD momentum.", None)
    nesterov: bool = option("Nesterov momentum.", None)
    weight_decay: float = option("L2 weight decay.", None)
    label_smoothing: float = option("Label smoothing of the training loss.", None)
    schedule: str = option("Learning-rate schedule over the whole run.", None, SCHEDULES)
    lookahead: bool = option(
        "Every 5 steps, pull the weights toward their slow moving average (airbench).", None
    )
    augment: bool = option(
        "Flips (each image every other epoch) and 2-pixel translations of training batches.", True
    )
    # The folder may move; resuming checks that its images are the run's by their digest.
    data: str | None = _where_and_how(
        "CIFAR-10 python folder or image folder (train/<class>/*, optional test/<class>/*); "
        "empty downloads CIFAR-10 with torchvision.",
        None,
        metavar="PATH",
    )
    val_fraction: float = option(
        "Share of training images held out, stratified, to rank runs (and pick the best epoch).",
        None,
    )
    keep_epoch: str = option(
        "Whose weights the run keeps: the epoch with the best validation accuracy, or the last.",
        None,
        KEEP_EPOCHS,
    )
    seed: int = option("Seed for initialisation, shuffling and augmentation.", 0)
    split_seed: int = option(
        "Seed of the validation split alone: runs on the same data with the same split seed "
        "hold out the same images (a smaller --val-fraction a subset of a larger one's), so "
        "they can be compared image by image.",
        0,
    )
    device: str = _where_and_how(
        "Where to train; auto picks cuda, then mps, then cpu. Recipes may differ on cuda.",
        "auto",
        DEVICES,
    )
    precision: str = option(
        "auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), "
        "fp32 elsewhere.",
        "auto",
        PRECISIONS,
    )
    compile: bool = _where_and_how(
        "torch.compile the network (pays off on CUDA for long runs).", False
    )
    log_every: int = option("Optimiser steps between points of the training-loss curve.", 10)
    experiment_name: str = _where_and_how(
        "MLflow experiment (ignored under `mlflow run`, which chose one).", "cifar10"
    )
    run_name: str | None = _where_and_how("MLflow run name; empty: <model>-<epochs>-epochs.", None)
    checkpoint_dir: str = _where_and_how(
        "Folder for each run's training state (<run id>.pt), saved after every epoch and on "
        "interruption.",
        "checkpoints",
        metavar="PATH",
    )
    keep_checkpoints: bool = _where_and_how(
        "Keep a finished run's checkpoint file, and a finished child run's (a sweep's trial, a "
        "repeat) checkpoint artifact; by default only stopped and failed runs keep theirs, to "
        "resume from.",
        False,
    )
    keep_models: int = _where_and_how(
        "Epochs whose weights the run keeps as models of its own (MLflow LoggedModels, ranked "
        "in its Models tab, registered with `register --epoch`): the best on validation; the "
        "others are deleted, files and all. 0: none.",
        3,
    )
    register: bool = _where_and_how(
        "Register the model as a new version, and move the `champion` alias to it when the "
        "gate (--gate) lets it.",
        True,
    )
    model_name: str = _where_and_how("Registered model name.", "cifar10-classifier")
    gate: str = _where_and_how(
        "When `champion` moves to a new version: significant (right more often on the "
        "validation images both hold out, by an exact one-sided McNemar test at --gate-alpha, "
        "and no class's recall significantly worse), better (a higher validation accuracy, "
        "however small), or off (never).",
        "significant",
        GATES,
    )
    gate_alpha: float = _where_and_how(
        "The gate's significance level: the risk it takes of promoting a version that is "
        "not really better.",
        0.05,
    )

    def __post_init__(self) -> None:
        _check_choice(self, "model")
        recipe = RECIPES[self.model]
        if self.device == "cuda":
            recipe = {**recipe, **CUDA_RECIPES.get(self.model, {})}
        for name, value in recipe.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        _check_fields(self)
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov", "needs a momentum above 0")
        if self.data is not None and not Path(self.data).exists():
            raise ConfigError("data", f"{self.data} does not exist")

    def as_params(self) -> dict[str, Any]:
        """The fields given a value, as MLflow parameters. The experiment is left out: the run
        is in it, and under `mlflow run` this field is not the one that chose it."""
        return {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if v is not None and k != "experiment_name"
        }


def _filled(text: str) -> bool:
    return bool(text.strip())


def _model_name(name: str) -> bool:
    """What MLflow's registry takes as a model's name, here and on a server."""
    return _filled(name) and len(name) <= 256 and "/" not in name and ":" not in name


# Each option's bounds, checked for every config and for every value a sweep may try.
_BOUNDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "trials": (lambda v: v >= 1, "must be at least 1"),
    "repeats": (lambda v: v >= 1, "must be at least 1"),
    "confirm_top": (lambda v: v == 0 or v >= 2, "must be 0 (no confirmation) or at least 2"),
    "confirm_seeds": (lambda v: v >= 1, "must be at least 1"),
    "workers": (lambda v: v >= 1, "must be at least 1"),
    "timeout": (lambda v: v > 0, "must be positive"),
    # Trials' runs are named <study>-trial-<n>-seed-<seed>, within a run name's 250.
    "study": (lambda v: _filled(v) and len(v) <= 200, "must be 1 to 200 characters"),
    "epochs": (lambda v: v >= 1, "must be at least 1"),
    "epoch": (lambda v: v >= 1, "must be at least 1"),
    "batch_size": (lambda v: v >= 1, "must be at least 1"),
    "log_every": (lambda v: v >= 1, "must be at least 1"),
    "keep_models": (lambda v: v >= 0, "must be 0 or more"),
    "lr": (lambda v: v > 0, "must be positive"),
    "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "must be 0 or more"),
    "val_fraction": (lambda v: 0 < v < 1, "must be between 0 and 1"),
    "split_seed": (lambda v: v >= 0, "must be 0 or more"),
    "gate_alpha": (lambda v: 0 < v < 1, "must be between 0 and 1"),
    "label_smoothing": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    # A name is kept as given, quotes and all; a tracking server's database holds 256
    # characters of an experiment's or a model's name and 250 of a run's.
    "experiment_name": (lambda v: _filled(v) and len(v) <= 256, "must be 1 to 256 characters"),
    "experiment": (lambda v: _filled(v) and len(v) <= 256, "must be 1 to 256 characters"),
    "model_name": (_model_name, "must be 1 to 256 characters, without / or : (a model URI's)"),
    "run_name": (lambda v: _filled(v) and len(v) <= 250, "must be 1 to 250 characters"),
    "checkpoint_dir": (_filled, "must not be empty"),
}


SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class SweepConfig:
    """A sweep's own settings. The training options its trials share are a TrainConfig's."""

    trials: int = option(
        "Trials the study runs, all workers and machines together; run again, a study "
        "continues up to it.",
        20,
    )
    timeout: float | None = option(
        "Seconds after which no new trial starts (those under way finish).", None
    )
    workers: int = option(
        "Trials at once on this machine, each in a process with its share of the cores.", 1
    )
    space: str | None = option(
        "YAML file of the options to search and their ranges; empty: the model's default space.",
        None,
        metavar="PATH",
    )
    sampler: str = option(
        "How trials choose values: tpe (learns from earlier trials), random, or grid (every "
        "combination of the space's values).",
        "tpe",
        SAMPLERS,
    )
    pruner: str = option(
        "Stop trials that trail the others at the same epoch, never during warm-up: median, "
        "hyperband, or none.",
        "median",
        PRUNERS,
    )
    study: str | None = option(
        "Optuna study; the same name continues it. Default: <experiment>-<model>.", None
    )
    storage: str | None = option(
        "Optuna storage URL that every worker and machine shares (postgresql://...); default: "
        "optuna.db beside the tracking store.",
        None,
        metavar="URL",
    )
    confirm_top: int = option(
        "After the search, train the settings of this many best trials again with new seeds, "
        "and decide the winner on their mean, tested against the runner-up on the same "
        "validation images; 0: take the best trial as it is.",
        2,
    )
    confirm_seeds: int = option(
        "New seeds each confirmed setting trains with (--confirm-top times this many "
        "trainings in all).",
        2,
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.space is not None and not Path(self.space).is_file():
            raise ConfigError("space", f"{self.space} is not a file")


@dataclass(frozen=True)
class RepeatConfig:
    """How many seeds of one setting `train` trains, and how many at once."""

    repeats: int = option(
        "Train this many seeds of the setting (--seed, --seed + 1, ...) as child runs of one "
        "parent run, all on the same validation split; the parent sums them up over seeds, "
        "and the best goes through the gate.",
        1,
    )
    workers: int = option(
        "Repeats at once on this machine, each in a process with its share of the cores.", 1
    )

    def __post_init__(self) -> None:
        _check_fields(self)


def flag(field_name: str) -> str:
    """The command-line option of a field: `--batch-size` for `batch_size`."""
    return "--" + field_name.replace("_", "-")


def field_help(name: str) -> str:
    return str(TrainConfig.__dataclass_fields__[name].metadata["help"])


def field_default(name: str) -> Any:
    return TrainConfig.__dataclass_fields__[name].default


def field_choices(name: str) -> tuple[str, ...]:
    return tuple(TrainConfig.__dataclass_fields__[name].metadata["choices"])


def changes_training(name: str) -> bool:
    """Whether training option `name` makes a different experiment (see `option`)."""
    return bool(TrainConfig.__dataclass_fields__[name].metadata["changes_training"])


def may_change_on_resume(name: str) -> bool:
    """Whether a resumed run may take a new value of training option `name`."""
    return bool(TrainConfig.__dataclass_fields__[name].metadata["may_change_on_resume"])


@dataclass(frozen=True)
class RegisterConfig:
    """What `register` is asked: one run, or the best finished run of an experiment."""

    experiment: str = option(
        "Experiment whose best finished run (by validation accuracy) is registered.",
        field_default("experiment_name"),
    )
    model_name: str = option(field_help("model_name"), field_default("model_name"))
    gate: str = option(field_help("gate"), field_default("gate"), field_choices("gate"))
    gate_alpha: float = option(field_help("gate_alpha"), field_default("gate_alpha"))
    run_id: str | None = option(
        "Register this run instead of the experiment's best.", None, metavar="RUN_ID"
    )
    epoch: int | None = option(
        "Register the model of this epoch of --run-id (one of those the run kept, see "
        "--keep-models), instead of the run's own.",
        None,
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.epoch is not None and self.run_id is None:
            raise ConfigError("epoch", "names an epoch of --run-id: give --run-id too")


def value_type(name: str, config_class: type = TrainConfig) -> type:
    """A field's type, without the None that stands for "the recipe's" or "not given"."""
    hint = typing.get_type_hints(config_class)[name]
    return next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))


def check_value(name: str, value: Any) -> None:
    """Raise ConfigError when `value` is out of the bounds of option `name`."""
    rule = _BOUNDS.get(name)
    if rule is not None and value is not None and not rule[0](value):
        raise ConfigError(name, f"{rule[1]}, got {value!r}")


def _check_fields(config: Any) -> None:
    """Every field of a config against its choices and its bounds."""
    for config_field in dataclasses.fields(config):
        _check_choice(config, config_field.name)
        check_value(config_field.name, getattr(config, config_field.name))


def _check_choice(config: Any, name: str) -> None:
    choices = type(config).__dataclass_fields__[name].metadata["choices"]
    value = getattr(config, name)
    if choices and value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}; got {value!r}")
