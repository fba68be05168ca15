"""Command line: parse, build a config, call. Heavy imports wait until a command runs.

Every command gets, as click's context object, the run `mlflow run` made for it (or None),
asked for once as the command starts (tracking/project_run.py).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .cli_options import (
    MLPROJECT_SPELLING,
    OrEmpty,
    given,
    options_of,
    recipes_epilog,
    refusals_as_option_errors,
)
from .config import (
    CHAMPION_ALIAS,
    RegisterConfig,
    RepeatConfig,
    SweepConfig,
    TrainConfig,
    field_default,
)
from .tracking import project_run as mlflow_project

if TYPE_CHECKING:
    from .interrupts import Interrupted, StopRequests


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        ctx.obj = mlflow_project.take()
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            if ctx.obj is not None:  # leave the reason on the run `mlflow run` made for us
                from .tracking.lifecycle import mark_refused

                mark_refused(ctx.obj, f"usage error: {error.format_message()}")
            raise
        except click.ClickException:
            raise
        except Exception as error:  # a server's refusal, wherever a command met it: one line
            from .tracking.refusals import said

            line = said(error, ctx.invoked_subcommand)
            if line is None:
                raise
            raise click.ClickException(line) from None


@click.group(cls=_Cli)
@click.version_option(package_name="cifar-experiments")
def cli() -> None:
    """Train, track and serve CIFAR-10 classifiers with PyTorch and MLflow."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_log = logging.getLogger("cifar_experiments")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    from .tracking.outage import show_retries

    show_retries()


@cli.command(epilog=recipes_epilog(), context_settings=MLPROJECT_SPELLING)
@click.option(
    "--resume",
    "resume",
    type=OrEmpty(click.STRING),
    default=None,
    metavar="RUN_ID",
    help="Continue this run from its last checkpoint, with its own options (those left at "
    "their defaults take the run's values; others must match, but --data may move and "
    "--device may change).",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes that train the model together on this machine, with PyTorch's "
    "DistributedDataParallel (torchrun --standalone): each takes its share of every batch of "
    "--batch-size. For several machines, start torchrun yourself (see the README).",
)
@options_of(TrainConfig)
@options_of(RepeatConfig)
@click.pass_obj
def train(project_run: str | None, resume: str | None, nproc_per_node: int, **options: Any) -> None:
    """Train a classifier and record everything in MLflow.

    Ends with the run ID, the test accuracy and the command that opens the MLflow UI. Ctrl-C
    or SIGTERM stops it after the current step, saves a checkpoint, marks the run KILLED and
    prints the command that resumes it. With --repeats, trains several seeds as child runs of
    one parent, which sums them up.

    Under torchrun every process runs this command: rank 0 records the one run, and the others
    train with it.
    """
    from . import cli_training
    from .distributed import World

    asked = {f.name: options.pop(f.name) for f in dataclasses.fields(RepeatConfig)}
    with refusals_as_option_errors():
        repeat = RepeatConfig(**asked)
    world = World.from_environment()
    if repeat.repeats > 1:
        if nproc_per_node > 1 or world.distributed:
            raise click.BadParameter("repeats train one process each; leave out --repeats "
                                     "or torchrun", param_hint="'--repeats'")  # fmt: skip
        _train_repeats(repeat, resume, options, project_run)
        return
    if nproc_per_node > 1 and world.launch is None:
        from .distributed import launch

        cli_training.check_shared_batch(resume, options, project_run, nproc_per_node)
        mlflow_project.hand_on(project_run)  # for rank 0 to train in
        sys.exit(launch(nproc_per_node, sys.argv[1:]))
    world.join(options["device"])
    trained = False
    try:
        if not world.main:
            trained = cli_training.follow(world)
            return
        if world.restart and resume is None:  # torchrun restarted the group: go on with its run
            from .tracking.past_runs import launched_as

            resume = project_run or launched_as(world.launch or "")
        trained = cli_training.train_one(resume, options, project_run, world)
    finally:
        world.leave(together=trained)


def _train_repeats(
    repeat: RepeatConfig, resume: str | None, options: dict[str, Any], project_run: str | None
) -> None:
    """Several seeds of one setting, as child runs of one parent (repeats.py)."""
    from . import cli_messages as say
    from . import cli_training, processes, repeats

    if resume is not None:
        raise click.BadParameter("repeats are not resumed; resume a child run on its own",
                                 param_hint="'--resume'")  # fmt: skip
    prepared = cli_training.prepare(
        None, options, project_run
    )  # every check, before the parent exists
    assert prepared is not None, "a new training always has something to do"
    plan = repeats.plan(prepared.config, repeat.repeats, repeat.workers, project_run)

    def stopped(interruption: Interrupted) -> str:
        return (
            f"Stopped by {interruption.signal_name}: repeats {plan.name} (parent run "
            f"{plan.parent_run_id}) stopped; the finished seeds are kept."
        )

    _carry_out(
        lambda stop: repeats.run(plan, stop, prepared.dataset), say.echo_repeats, stopped,
        processes.WorkerFailed, project_run,
    )  # fmt: skip


def _carry_out(
    work: Callable[[StopRequests], Any], echo: Callable[[Any], None],
    stopped: Callable[[Interrupted], str], failures: type[Exception], project_run: str | None,
) -> None:  # fmt: skip
    """`work(stop)` with Ctrl-C and SIGTERM stopping it cleanly, then `echo` of what it did. A
    stop is said by `stopped` and exits with the signal's status; `failures` are said in one
    line; a registration that failed after the work finished is said with its retry."""
    from . import interrupts, registry
    from .cli_messages import registration_failed

    with interrupts.StopRequests().installed() as stop:
        try:
            outcome = work(stop)
        except interrupts.Interrupted as interruption:
            click.echo(stopped(interruption), err=True)
            sys.exit(interruption.exit_code)
        except failures as error:
            raise click.ClickException(str(error)) from None
        except registry.RegistrationFailed as failure:
            registration_failed(failure, project_run, echo)
            return
    echo(outcome)


@cli.command(context_settings=MLPROJECT_SPELLING)
@options_of(SweepConfig)
@options_of(TrainConfig)
@click.pass_obj
def sweep(project_run: str | None, **options: Any) -> None:
    """Search training options with Optuna: one parent MLflow run per study, a child run per
    trial, and the best trial's model registered when the sweep ends.

    Training options given here are fixed for every trial; those in the space (--space, or the
    model's default space) are searched. Run the same command again, here or on another
    machine sharing --storage and the tracking server, to continue the study. Ctrl-C stops
    every worker after its current step.
    """
    from . import cli_messages as say
    from .sweep import study, workers
    from .tracking.store import TrackingError

    context = click.get_current_context()
    settings = {f.name: options.pop(f.name) for f in dataclasses.fields(SweepConfig)}
    fixed = {name for name in options if given(context, name)}
    try:
        with refusals_as_option_errors():
            plan = study.prepare(SweepConfig(**settings), options, fixed, project_run)
    except (TrackingError, study.SweepError) as error:
        raise click.ClickException(str(error)) from None
    _carry_out(
        lambda stop: workers.run(plan, stop), say.echo_sweep,
        lambda interruption: say.sweep_interrupted(interruption, plan, project_run),
        study.SweepError, project_run,
    )  # fmt: skip


@cli.command(context_settings=MLPROJECT_SPELLING)
@options_of(RegisterConfig)
def register(**options: Any) -> None:
    """Register the best finished run of an experiment (or --run-id), as training does.

    For runs trained with --no-register or by someone else, or whose registration failed: it
    becomes a new version, and `champion` moves to it only if its validation accuracy beats
    the champion's.
    """
    from mlflow.exceptions import MlflowException

    from . import registry
    from .cli_messages import echo_registration

    with refusals_as_option_errors():
        asked = RegisterConfig(**options)
    run_id = asked.run_id
    try:
        if run_id is None:
            run_id = registry.best_finished_run(asked.experiment)
            click.echo(f"Best run of {asked.experiment!r}: {run_id}")
        registration = registry.register_run(
            run_id, asked.model_name, asked.gate, asked.gate_alpha, asked.epoch
        )
    except registry.RegistryError as error:
        raise click.ClickException(str(error)) from None
    except MlflowException as error:
        raise _mlflow_failed(error, f"register run {run_id}") from None
    echo_registration(registration)


@cli.command()
@click.argument("name")
@click.argument("version")
def promote(name: str, version: str) -> None:
    """Move `champion` of registered model NAME to VERSION by hand, past the gate; the
    version's tag gate.verdict says `manual`."""
    from mlflow.exceptions import MlflowException

    from . import registry
    from .cli_messages import echo_registration

    try:
        registration = registry.promote(name, version)
    except MlflowException as error:
        raise _mlflow_failed(error, f"promote {name} version {version}") from None
    echo_registration(registration)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option(
    "--split",
    type=click.Choice(["val", "test"]),
    default="val",
    show_default=True,
    help="The validation images both held out (what decisions use), or the test images.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write the numbers (compare.json) and the images one gets right and the other "
    "wrong (flipped.png) in this folder.",
)
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    help="Where the runs' data is now, for the pictures: by default where A was trained from.",
)
def compare(a: str, b: str, split: str, output: Path | None, data: Path | None) -> None:
    """Compare two models image by image on the images both held out. A and B are each a run
    ID, models:/NAME/VERSION or models:/NAME@ALIAS."""
    import json

    from mlflow.exceptions import MlflowException

    from . import comparison, registry
    from .tracking.past_runs import data_source, saved_predictions

    try:
        runs = [registry.run_of(reference) for reference in (a, b)]
        saved = [saved_predictions(run, split) for run in runs]
    except registry.RegistryError as error:
        raise click.ClickException(str(error)) from None
    except MlflowException as error:
        raise _mlflow_failed(error, "read the runs") from None
    found = []
    for reference, predictions in zip((a, b), saved, strict=True):
        if predictions is None:
            raise click.ClickException(
                f"{reference} saved no per-image predictions of its {split} split (it was "
                "trained before runs saved them); train it again to compare it"
            )
        found.append(predictions)
    report = comparison.compare(a, found[0], b, found[1], split)
    if report is None:
        raise click.ClickException(f"{a} and {b} share no {split} images: they saw other data")
    click.echo(report.text())
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "compare.json").write_text(json.dumps(report.as_json(), indent=2))
        click.echo(f"Written: {output / 'compare.json'}")
        where = data or data_source(runs[0])
        click.echo(comparison.write_flips(a, found[0], b, found[1], split, where, output))


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
        raise _mlflow_failed(error, f"use model {model_uri}") from None
    if as_json:
        click.echo(answer.to_json(orient="records", indent=2))
    else:
        table = answer[["file", "label", "score"]].assign(
            score=answer["score"].map("{:.1%}".format)
        )
        click.echo(table.to_string(index=False))


def _mlflow_failed(error: Exception, doing: str) -> click.ClickException:
    """What MLflow refused while a command was `doing` something, in one line: a server's
    refusal said as such, else MLflow's own words."""
    from .processes import one_line
    from .tracking.refusals import said

    command = click.get_current_context().info_name
    return click.ClickException(said(error, command) or f"cannot {doing}: {one_line(error)}")


def main() -> None:
    cli(prog_name="cifar-experiments")
