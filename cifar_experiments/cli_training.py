"""What `cifar-experiments train` does for one training: options checked into a config and
its data, then trained and recorded in one MLflow run, by one process or by torchrun's
processes together (rank 0 records; the others `follow`)."""

from __future__ import annotations

import logging
import shlex
import signal
import sys
from typing import TYPE_CHECKING, Any

import click

from .cli_options import given, hint, refusals_as_option_errors
from .config import TrainConfig

if TYPE_CHECKING:
    from .distributed import World
    from .experiment import Prepared


def train_one(
    resume: str | None, options: dict[str, Any], project_run: str | None, world: World
) -> bool:
    """One training, recorded in one MLflow run: the command's work on its first process.
    Answers whether the other processes, if any, trained with it."""
    from . import cli_messages as say
    from . import experiment, interrupts, registry
    from .callbacks import TrainingDiverged
    from .checkpoint import CheckpointError
    from .distributed import Handoff, lost_a_rank
    from .processes import one_line
    from .tracking.outage import ServerLost

    shared_by = world.agree_on_stop if world.distributed else None
    with interrupts.StopRequests(shared_by).installed() as stop, Handoff(world) as handoff:
        try:
            prepared = prepare(resume, options, project_run, world)
            if prepared is None:
                return False
            summary = experiment.train(prepared, stop, project_run=project_run, handoff=handoff)
        # A disk that filled up during training, or a loss that became NaN.
        except (CheckpointError, TrainingDiverged) as error:
            raise click.ClickException(f"{error}; the run is marked FAILED") from None
        except interrupts.Interrupted as interruption:
            click.echo(say.interrupted(interruption, project_run), err=True)
            sys.exit(interruption.exit_code)
        except KeyboardInterrupt:  # Ctrl-C where no handler could be installed (not main thread)
            click.echo("Interrupted.", err=True)
            sys.exit(interrupts.Interrupted(signal.SIGINT).exit_code)
        except ServerLost as lost:
            raise click.ClickException(say.server_lost(lost, project_run)) from None
        except registry.RegistrationFailed as failure:
            say.registration_failed(failure, project_run, say.echo_summary)
            return handoff.handed
        except RuntimeError as error:
            if not lost_a_rank(error):
                raise
            raise click.ClickException(
                f"another process of this training stopped ({one_line(error)}); the run is "
                "marked FAILED and resumes from its last checkpoint"
            ) from None
    say.echo_summary(summary)
    return handoff.handed


def follow(world: World) -> bool:
    """A rank other than 0: train with rank 0, which speaks for the training (progress, stops)
    and says what went wrong, if anything did. Answers whether rank 0 started a training."""
    from . import experiment, interrupts
    from .processes import one_line

    logging.getLogger("cifar_experiments").setLevel(logging.ERROR)
    with interrupts.StopRequests(world.agree_on_stop).installed() as stop:
        try:
            return experiment.follow(world, stop)
        except interrupts.Interrupted as interruption:
            sys.exit(interruption.exit_code)
        except Exception as error:  # rank 0 gone, most often: torchrun stops the group
            raise click.ClickException(f"rank {world.rank}: {one_line(error)}") from None


def prepare(
    resume: str | None, options: dict[str, Any], project_run: str | None,
    world: World | None = None,
) -> Prepared | None:  # fmt: skip
    """Options -> a checked config, loaded data and, for --resume, the saved state; or None
    when there is nothing to do. Every refusal here is a usage error and makes no run."""
    from . import experiment
    from .cli_messages import resume_command
    from .distributed import WorldError
    from .tracking.store import TrackingError

    resumption = None
    try:
        with refusals_as_option_errors():
            if resume is not None:
                if project_run not in (None, resume):
                    raise experiment.ResumeError(
                        f"`mlflow run` made a new run ({project_run}) for this; resume the old "
                        f"one in place with: {resume_command(resume, project=True)}"
                    )
                planned = experiment.plan_resume(resume, options)
                if planned is None:
                    click.echo(f"Run {resume} has already finished; there is nothing to resume.")
                    return None
                config, resumption = planned
            else:
                config = _new_config(options, project_run)
            return experiment.prepare(config, resumption, world=world)
    except (experiment.ResumeError, TrackingError, WorldError) as error:
        if resume is None:
            raise click.ClickException(str(error)) from None
        raise click.BadParameter(str(error), param_hint="'--resume'") from None


def _new_config(options: dict[str, Any], project_run: str | None) -> TrainConfig:
    from .engine import Runtime

    # A recipe may differ by device (CUDA_RECIPES), so "auto" is settled first.
    device = Runtime.resolve(options["device"]).device.type
    experiment_name = experiment_chosen(options["experiment_name"], project_run)
    return TrainConfig(**{**options, "device": device, "experiment_name": experiment_name})


def check_shared_batch(
    resume: str | None, options: dict[str, Any], project_run: str | None, processes: int
) -> None:
    """Refuse a new training's batch that `processes` cannot share equally before any of them
    starts (rank 0 checks every training again, a resumed run's too)."""
    from .distributed import World, WorldError

    if resume is not None:
        return
    with refusals_as_option_errors():
        config = _new_config(options, project_run)
    try:
        World(size=processes).check_batch(config.batch_size)
    except WorldError as error:
        raise click.ClickException(str(error)) from None


def experiment_chosen(asked: str, project_run: str | None) -> str:
    """The experiment a new run goes in: `mlflow run` has chosen it already, and another one
    asked for as a parameter would be logged beside a run that is not in it."""
    if project_run is None:
        return asked
    from .tracking.store import experiment_of

    chosen = experiment_of(project_run)
    if given(click.get_current_context(), "experiment_name") and asked != chosen:
        raise click.BadParameter(
            f"`mlflow run` put this run in experiment {chosen!r}; choose the experiment with "
            f"`mlflow run --experiment-name {shlex.quote(asked)}` instead",
            param_hint=hint("experiment_name"),
        )
    return chosen
