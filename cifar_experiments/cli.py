"""Command line: parse, build a config, call. Heavy imports wait until a command runs."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shlex
import signal
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from . import registry

from .config import (
    CHAMPION_ALIAS,
    CUDA_RECIPES,
    RECIPES,
    ConfigError,
    SweepConfig,
    TrainConfig,
    field_default,
    field_help,
    value_type,
)


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            # `mlflow run` made a run before starting us; leave the reason on it.
            if os.environ.get("MLFLOW_RUN_ID"):
                from .tracking import mark_project_run_failed

                mark_project_run_failed(f"usage error: {error.format_message()}")
            raise


@click.group(cls=_Cli)
@click.version_option(package_name="cifar-experiments")
def cli() -> None:
    """Train, track and serve CIFAR-10 classifiers with PyTorch and MLflow."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_log = logging.getLogger("cifar_experiments")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)


_RECIPE_FIELDS = frozenset(next(iter(RECIPES.values())))
_FROM_RECIPE = "  [default: the model's recipe]"
_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING, bool: click.BOOL}


class _OrEmpty(click.ParamType):
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


def _options_of(config_class: type) -> Callable[[Callable], Callable]:
    """One option per field of `config_class`, in the fields' order, with its default, help
    and choices. A bool is a switch: `--name/--no-name` for people, `--name true|false` for
    MLproject parameters."""

    def decorate(command: Callable) -> Callable:
        for config_field in reversed(dataclasses.fields(config_class)):
            name, meta = config_field.name, config_field.metadata
            switch = value_type(name, config_class) is bool
            if switch:
                command = _with_no_flag(name, command)
            command = click.option(
                _flag(name),
                name,
                type=_click_type(name, config_class),
                default=config_field.default,
                show_default=config_field.default is not None,
                metavar=meta["metavar"],
                help=meta["help"] + (_FROM_RECIPE if name in _RECIPE_FIELDS else ""),
                **({"is_flag": False, "flag_value": True} if switch else {}),
            )(command)
        return command

    return decorate


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _click_type(name: str, config_class: type) -> click.ParamType:
    """Click's type for a field: its choices, or its value type; one that may be None (and
    any bool, as MLproject passes them) also takes "" for "not given"."""
    config_field = config_class.__dataclass_fields__[name]
    choices = config_field.metadata["choices"]
    kind = click.Choice(choices) if choices else _CLICK_TYPES[value_type(name, config_class)]
    hint = typing.get_type_hints(config_class)[name]
    optional = type(None) in typing.get_args(hint)
    return _OrEmpty(kind) if optional or value_type(name, config_class) is bool else kind


def _with_no_flag(name: str, command: Callable) -> Callable:
    """`--no-name`, the same as `--name false`."""

    @functools.wraps(command)
    def merged(**options: Any) -> Any:
        if options.pop(f"no_{name}"):
            options[name] = False
        return command(**options)

    same = f"Same as {_flag(name)} false."
    return click.option(_flag(f"no_{name}"), f"no_{name}", is_flag=True, help=same)(merged)


def _recipes_epilog() -> str:
    def settings(recipe: dict[str, Any]) -> str:
        return ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in recipe.items()
        )

    lines = ["\b", "Recipes (what unset options become, per --model):"]
    lines += [f"  {model}: {settings(recipe)}" for model, recipe in RECIPES.items()]
    lines += [f"  {model} on cuda: {settings(recipe)}" for model, recipe in CUDA_RECIPES.items()]
    return "\n".join(lines)


@cli.command(
    epilog=_recipes_epilog(),
    # `mlflow run` hands on parameters it does not declare as `--batch_size 256`.
    context_settings={"token_normalize_func": lambda name: name.replace("_", "-")},
)
@click.option(
    "--resume",
    "resume",
    type=_OrEmpty(click.STRING),
    default=None,
    metavar="RUN_ID",
    help="Continue this run from its last checkpoint, with its own options (those left at "
    "their defaults take the run's values; others must match, but --data may move and "
    "--device may change).",
)
@_options_of(TrainConfig)
def train(resume: str | None, **options: Any) -> None:
    """Train a classifier and record everything in MLflow.

    Ends with the run ID, the test accuracy and the command that opens the MLflow UI. Ctrl-C
    or SIGTERM stops it after the current step, saves a checkpoint, marks the run KILLED and
    prints the command that resumes it.
    """
    from . import experiment, interrupts
    from .callbacks import TrainingDiverged
    from .checkpoint import CheckpointError
    from .tracking import ServerLost

    # MLflow clears this variable once it has taken up the run, so note it first.
    under_mlflow_run = "MLFLOW_RUN_ID" in os.environ
    with interrupts.StopRequests().installed() as stop:
        try:
            prepared = _prepare(resume, options)
            if prepared is None:
                return
            summary = experiment.train(prepared, stop)
        # A disk that filled up during training, or a loss that became NaN.
        except (CheckpointError, TrainingDiverged) as error:
            raise click.ClickException(f"{error}; the run is marked FAILED") from None
        except interrupts.Interrupted as interruption:
            click.echo(_interrupted_message(interruption, under_mlflow_run), err=True)
            sys.exit(interruption.exit_code)
        except KeyboardInterrupt:  # Ctrl-C where no handler could be installed (not main thread)
            click.echo("Interrupted.", err=True)
            sys.exit(interrupts.Interrupted(signal.SIGINT).exit_code)
        except ServerLost as lost:
            raise click.ClickException(_server_lost_message(lost, under_mlflow_run)) from None
        except experiment.RegistrationFailed as failure:
            _echo_summary(failure.summary)
            retry = (
                f"cifar-experiments register --run-id {failure.summary.run_id} "
                f"--model-name {shlex.quote(prepared.config.model_name)}"
            )
            message = f"Registering the model failed: {failure.reason}. Retry with: {retry}"
            # `mlflow run` marks its run FAILED whenever we exit non-zero, and the run did
            # finish: there the error is said, not signalled.
            if under_mlflow_run:
                click.echo(f"Error: {message}", err=True)
                return
            raise click.ClickException(message) from None
    _echo_summary(summary)


def _prepare(resume: str | None, options: dict[str, Any]) -> Any:
    """Options -> a checked config, loaded data and, for --resume, the saved state; or None
    when there is nothing to do. Every refusal here is a usage error and makes no run."""
    from . import experiment
    from .checkpoint import CheckpointError
    from .data import DataError
    from .engine import DeviceUnavailable, Runtime
    from .tracking import TrackingError

    resumption = None
    try:
        if resume is not None:
            project_run = os.environ.get("MLFLOW_RUN_ID")
            if project_run not in (None, resume):
                raise experiment.ResumeError(
                    f"`mlflow run` made a new run ({project_run}) for this; resume the old one "
                    f"in place with: {_resume_command(resume, project=True)}"
                )
            planned = experiment.plan_resume(resume, options)
            if planned is None:
                click.echo(f"Run {resume} has already finished; there is nothing to resume.")
                return None
            config, resumption = planned
        else:
            # A recipe may differ by device (CUDA_RECIPES), so "auto" is settled first.
            device = Runtime.resolve(options["device"]).device.type
            experiment_name = _experiment_chosen(options["experiment_name"])
            config = TrainConfig(
                **{**options, "device": device, "experiment_name": experiment_name}
            )
        return experiment.prepare(config, resumption)
    except ConfigError as error:
        raise click.BadParameter(error.message, param_hint=_hint(error.field)) from None
    except (experiment.ResumeError, TrackingError) as error:
        if resume is None:
            raise click.ClickException(str(error)) from None
        raise click.BadParameter(str(error), param_hint="'--resume'") from None
    except CheckpointError as error:
        raise click.BadParameter(str(error), param_hint=_hint("checkpoint_dir")) from None
    except DataError as error:
        raise click.BadParameter(str(error), param_hint=_hint("data")) from None
    except DeviceUnavailable as error:
        raise click.BadParameter(str(error), param_hint=_hint("device")) from None


def _experiment_chosen(asked: str) -> str:
    """The experiment a new run goes in: `mlflow run` has chosen it already, and another one
    asked for as a parameter would be logged beside a run that is not in it."""
    project_run = os.environ.get("MLFLOW_RUN_ID")
    if project_run is None:
        return asked
    from .tracking import experiment_of

    chosen = experiment_of(project_run)
    if _given(click.get_current_context(), "experiment_name") and asked != chosen:
        raise click.BadParameter(
            f"`mlflow run` put this run in experiment {chosen!r}; choose the experiment with "
            f"`mlflow run --experiment-name {shlex.quote(asked)}` instead",
            param_hint=_hint("experiment_name"),
        )
    return chosen


def _interrupted_message(interruption: Any, under_mlflow_run: bool) -> str:
    if interruption.run_id is None:
        return f"Stopped by {interruption.signal_name} before the run started."
    saved = (
        "its checkpoint holds the state at the stop"
        if interruption.checkpointed
        else "it resumes from its last checkpoint"
    )
    # `mlflow run` marks its run FAILED whenever our exit status is not 0 (README).
    status = "KILLED (`mlflow run` records it as FAILED)" if under_mlflow_run else "KILLED"
    return (
        f"Stopped by {interruption.signal_name}: run {interruption.run_id} is {status} and "
        f"{saved}. Resume it with:\n  {_resume_command(interruption.run_id, under_mlflow_run)}"
    )


def _server_lost_message(lost: Any, under_mlflow_run: bool) -> str:
    if lost.checkpoint is None:
        return f"{lost}: start it again once the server answers"
    # The server cannot be asked how `mlflow run` made the run's environment.
    again = (
        f"the `mlflow run` command that started it, adding --run-id {lost.run_id} "
        f"-P resume={lost.run_id}"
        if under_mlflow_run
        else _resume_command(lost.run_id, project=False)
    )
    return f"{lost}. Once the server answers, continue it with: {again}"


def _resume_command(run_id: str, project: bool) -> str:
    """The command that resumes `run_id` the way it was started: `mlflow run` in place (its
    own --run-id, so no new run is made), or this CLI."""
    if not project:
        return f"cifar-experiments train --resume {run_id}"
    from .tracking import find_run

    env_manager = find_run(run_id).env_manager or "local"
    return (
        f"mlflow run {shlex.quote(os.getcwd())} --run-id {run_id} -P resume={run_id} "
        f"--env-manager {env_manager}"
    )


def _echo_summary(summary: Any) -> None:
    from . import tracking

    result = (
        f"test accuracy {summary.test_accuracy:.2%}"
        if summary.test_accuracy is not None
        else "no test split"
    )
    if summary.registration is not None:
        _echo_registration(summary.registration)
    page = tracking.run_page(summary.run_id)
    click.echo(
        f"Run {summary.run_id} finished: {result} (epoch {summary.kept_epoch} kept, validation "
        f"{summary.val_accuracy:.2%}). Browse it: {tracking.browse(page)}"
    )


@cli.command(
    # `mlflow run` hands on parameters it does not declare as `--batch_size 256`.
    context_settings={"token_normalize_func": lambda name: name.replace("_", "-")},
)
@_options_of(SweepConfig)
@_options_of(TrainConfig)
def sweep(**options: Any) -> None:
    """Search training options with Optuna: one parent MLflow run per study, a child run per
    trial, and the best trial's model registered when the sweep ends.

    Training options given here are fixed for every trial; those in the space (--space, or the
    model's default space) are searched. Run the same command again, here or on another
    machine sharing --storage and the tracking server, to continue the study. Ctrl-C stops
    every worker after its current step.
    """
    from . import interrupts, registry, search_space, tracking
    from . import sweep as sweeping
    from .data import DataError, load_dataset
    from .engine import DeviceUnavailable, Runtime

    under_mlflow_run = "MLFLOW_RUN_ID" in os.environ  # sweep.plan takes it out
    context = click.get_current_context()
    settings = {f.name: options.pop(f.name) for f in dataclasses.fields(SweepConfig)}
    fixed = {name for name in options if _given(context, name)}
    try:
        sweep_config = SweepConfig(**settings)
        # A recipe may differ by device (CUDA_RECIPES), so "auto" is settled first.
        base = {**options, "device": Runtime.resolve(options["device"]).device.type}
        checked = TrainConfig(**base)  # every fixed option, before any trial
        space = search_space.load(sweep_config.space, checked.model, leave_out=fixed)
        both = sorted(fixed & set(space))
        if both:
            raise click.UsageError(
                f"{', '.join(map(_flag, both))}: fixed for every trial, and searched by the "
                "space; give one or the other"
            )
        tracking.check_store()
        if not under_mlflow_run:
            tracking.check_can_train_in(checked.experiment_name)
        load_dataset(checked.data)  # bad data is refused now, and the workers read it decoded
        plan = sweeping.plan(sweep_config, base, space)
    except ConfigError as error:
        raise click.BadParameter(error.message, param_hint=_hint(error.field)) from None
    except search_space.SpaceError as error:
        raise click.BadParameter(str(error), param_hint=_hint("space")) from None
    except DataError as error:
        raise click.BadParameter(str(error), param_hint=_hint("data")) from None
    except DeviceUnavailable as error:
        raise click.BadParameter(str(error), param_hint=_hint("device")) from None
    except (tracking.TrackingError, sweeping.SweepError) as error:
        raise click.ClickException(str(error)) from None
    with interrupts.StopRequests().installed() as stop:
        try:
            outcome = sweeping.run(plan, stop)
        except interrupts.Interrupted as interruption:
            again = (
                f"mlflow run {shlex.quote(os.getcwd())} -e sweep --run-id {plan.parent_run_id} "
                "with the same parameters"
                if under_mlflow_run
                else "the same command"
            )
            click.echo(
                f"Stopped by {interruption.signal_name}: sweep {plan.study_name} (parent run "
                f"{plan.parent_run_id}) stopped; its finished trials are kept. Continue it to "
                f"{plan.budget} trials with {again}.",
                err=True,
            )
            sys.exit(interruption.exit_code)
        except sweeping.SweepError as error:
            raise click.ClickException(str(error)) from None
    _echo_sweep(outcome, plan.budget)
    if not options["register"] or outcome.best_run_id is None:
        return
    try:
        _echo_registration(registry.register_run(outcome.best_run_id, options["model_name"]))
    except Exception as error:  # the registry unreachable, say: the sweep itself is done
        retry = f"cifar-experiments register --run-id {outcome.best_run_id}"
        message = getattr(error, "message", None) or str(error)
        raise click.ClickException(
            f"Registering the best trial failed: {message}. Retry: {retry}"
        ) from None


def _given(context: click.Context, name: str) -> bool:
    """Whether option `name` (or its --no- twin) was given rather than left at its default."""
    sources = (context.get_parameter_source(n) for n in (name, f"no_{name}"))
    return any(s not in (None, click.core.ParameterSource.DEFAULT) for s in sources)


def _echo_sweep(outcome: Any, budget: int) -> None:
    from . import tracking

    states = ", ".join(f"{count} {state}" for state, count in sorted(outcome.states.items()))
    best = outcome.best
    if best is None:
        found = "No trial completed, so nothing is registered"
    else:
        values = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
        )
        found = (
            f"Best: trial {best.number} (run {outcome.best_run_id}), validation "
            f"{best.value:.2%}, {values}"
        )
    click.echo(
        f"Sweep {outcome.study_name} (parent run {outcome.parent_run_id}): {states} of "
        f"{budget} trials. {found}. Browse it: "
        f"{tracking.browse(tracking.run_page(outcome.parent_run_id))}"
    )


@cli.command()
@click.option(
    "--experiment",
    default=field_default("experiment_name"),
    show_default=True,
    help="Experiment whose best finished run (by validation accuracy) is registered.",
)
@click.option("--model-name", default=field_default("model_name"), show_default=True,
              help=field_help("model_name"))  # fmt: skip
@click.option(
    "--run-id",
    type=_OrEmpty(click.STRING),
    default="",
    help="Register this run instead of the experiment's best.",
)
def register(experiment: str, model_name: str, run_id: str | None) -> None:
    """Register the best finished run of an experiment (or --run-id), as training does.

    For runs trained with --no-register or by someone else, or whose registration failed: it
    becomes a new version, and `champion` moves to it only if its validation accuracy beats
    the champion's.
    """
    from mlflow.exceptions import MlflowException

    from . import registry

    try:
        if run_id is None:
            run_id = registry.best_finished_run(experiment)
            click.echo(f"Best run of {experiment!r}: {run_id}")
        registration = registry.register_run(run_id, model_name)
    except registry.RegistryError as error:
        raise click.ClickException(str(error)) from None
    except MlflowException as error:
        raise click.ClickException(f"cannot register run {run_id}: {error.message}") from None
    _echo_registration(registration)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--model",
    "model_uri",
    default=f"models:/{field_default('model_name')}@{CHAMPION_ALIAS}",
    show_default=True,
    help="Any MLflow model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
def predict(paths: tuple[Path, ...], model_uri: str, as_json: bool) -> None:
    """Label image files (PNG, JPEG, ...) or every image in a folder."""
    from mlflow.exceptions import MlflowException

    from .data import image_files
    from .serving import predict_files

    files = image_files(list(paths))
    if not files:
        raise click.BadParameter("no image files found", param_hint="PATHS")
    try:
        answer = predict_files(model_uri, files)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="PATHS") from None
    except MlflowException as error:
        raise click.ClickException(f"cannot use model {model_uri}: {error.message}") from None
    if as_json:
        click.echo(answer.to_json(orient="records", indent=2))
    else:
        table = answer[["file", "label", "score"]].assign(
            score=answer["score"].map("{:.1%}".format)
        )
        click.echo(table.to_string(index=False))


def _echo_registration(registration: registry.Registration) -> None:
    from . import tracking

    name, version = registration.name, registration.version
    click.echo(
        f"Registered {name} version {version}; {registration.message}. See it: "
        f"{tracking.browse(tracking.model_version_page(name, version))}. Serve the champion: "
        f"mlflow models serve -m models:/{name}@{CHAMPION_ALIAS} --env-manager local -p 5001"
    )


def _hint(field_name: str) -> str:
    return f"'{_flag(field_name)}'"


def main() -> None:
    cli(prog_name="cifar-experiments")
