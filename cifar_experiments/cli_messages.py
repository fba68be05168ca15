"""What the commands print: a finished training, sweep or registration with the link that
shows it, and a stop with the command that continues it."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .config import CHAMPION_ALIAS
from .statistics import percent
from .tracking import links

if TYPE_CHECKING:
    from .experiment import Summary
    from .interrupts import Interrupted
    from .registry import Registration, RegistrationFailed
    from .repeats import Outcome as RepeatOutcome
    from .sweep.confirm import Verdict
    from .sweep.study import Outcome, Plan
    from .tracking.outage import ServerLost


def echo_summary(summary: Summary) -> None:
    assert summary.run_id is not None, "a training the CLI ran is always tracked"
    result = (
        f"test accuracy {summary.test_accuracy:.2%}"
        if summary.test_accuracy is not None
        else "no test split"
    )
    if summary.registration is not None:
        echo_registration(summary.registration)
    click.echo(
        f"Run {summary.run_id} finished: {result} (epoch {summary.kept_epoch} kept, validation "
        f"{summary.val_accuracy:.2%}). Browse it: {_browse_run(summary.run_id)}"
    )


def echo_sweep(outcome: Outcome) -> None:
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
        f"{outcome.budget} trials. {found}. Browse it: {_browse_run(outcome.parent_run_id)}"
    )
    if outcome.verdict is not None:
        click.echo(verdict_line(outcome.verdict))
    if outcome.registration is not None:
        echo_registration(outcome.registration)


def verdict_line(verdict: Verdict) -> str:
    winner, runner_up = verdict.standings[0], verdict.standings[1]
    evidence = (
        f"{percent(winner.mean)} against trial {runner_up.trial}'s {percent(runner_up.mean)} on "
        f"average over {len(winner.run_ids)} new seed(s), on {verdict.images:,} shared "
        f"validation images, p = {verdict.p_values[0]:.2g}"
    )
    if len(verdict.tied) == 1:
        found = f"trial {winner.trial} wins with {evidence}"
    else:
        tied = " and ".join(", ".join(map(str, verdict.tied)).rsplit(", ", 1))
        found = (
            f"a tie, trials {tied} cannot be told apart ({evidence}); trial {winner.trial}, "
            "the better on average, goes on"
        )
    return f"Confirmed: {found}. Its best run: {verdict.best_run_id}."


def echo_repeats(outcome: RepeatOutcome) -> None:
    summary = outcome.summary

    def over_seeds(name: str, what: str) -> str:
        if f"repeats/{name}_mean" not in summary:
            return f"no {what}"
        low, high = summary[f"repeats/{name}_ci_low"], summary[f"repeats/{name}_ci_high"]
        return (
            f"{what} {summary[f'repeats/{name}_mean']:.2%} on average (95 % interval "
            f"{low:.2%} to {high:.2%}, standard deviation {summary[f'repeats/{name}_std']:.2%})"
        )

    click.echo(
        f"Repeats {outcome.name} (parent run {outcome.parent_run_id}): "
        f"{over_seeds('val_accuracy', 'validation')}; {over_seeds('test_accuracy', 'test')}. "
        f"Best: seed {outcome.best_seed} (run {outcome.best_run_id}). Browse it: "
        f"{_browse_run(outcome.parent_run_id)}"
    )
    if outcome.registration is not None:
        echo_registration(outcome.registration)


def echo_registration(registration: Registration) -> None:
    name, version = registration.name, registration.version
    click.echo(
        f"Registered {name} version {version}; {registration.message}. See it: "
        f"{links.browse(links.model_version_page(name, version))}. Serve the champion: "
        f"mlflow models serve -m models:/{name}@{CHAMPION_ALIAS} --env-manager local -p 5001"
    )


def registration_failed(
    failure: RegistrationFailed, project_run: str | None, echo: Callable[[Any], None]
) -> None:
    """The training, repeats or sweep finished (`echo` says how), but registering its model
    failed: say so, with the command that retries. `mlflow run` marks its run FAILED whenever
    we exit non-zero, and the run did finish: there the error is said, not signalled."""
    echo(failure.result)
    retry = (
        f"cifar-experiments register --run-id {failure.run_id} "
        f"--model-name {shlex.quote(failure.name)}"
    )
    message = f"Registering the model failed: {failure.reason}. Retry with: {retry}"
    if project_run is not None:
        click.echo(f"Error: {message}", err=True)
        return
    raise click.ClickException(message)


def interrupted(interruption: Interrupted, project_run: str | None) -> str:
    if interruption.run_id is None:
        return f"Stopped by {interruption.signal_name} before the run started."
    saved = (
        "its checkpoint holds the state at the stop"
        if interruption.checkpointed
        else "it resumes from its last checkpoint"
    )
    # `mlflow run` marks its run FAILED whenever our exit status is not 0 (README).
    status = "KILLED (`mlflow run` records it as FAILED)" if project_run else "KILLED"
    again = resume_command(interruption.run_id, project=project_run is not None)
    return (
        f"Stopped by {interruption.signal_name}: run {interruption.run_id} is {status} and "
        f"{saved}. Resume it with:\n  {again}"
    )


def sweep_interrupted(interruption: Interrupted, plan: Plan, project_run: str | None) -> str:
    again = (
        f"mlflow run {shlex.quote(os.getcwd())} -e sweep --run-id {plan.parent_run_id} "
        "with the same parameters"
        if project_run
        else "the same command"
    )
    return (
        f"Stopped by {interruption.signal_name}: sweep {plan.study_name} (parent run "
        f"{plan.parent_run_id}) stopped; its finished trials are kept. Continue it to "
        f"{plan.budget} trials with {again}."
    )


def server_lost(lost: ServerLost, project_run: str | None) -> str:
    if lost.checkpoint is None:
        return f"{lost}: start it again once the server answers"
    # The server cannot be asked how `mlflow run` made the run's environment.
    again = (
        f"the `mlflow run` command that started it, adding --run-id {lost.run_id} "
        f"-P resume={lost.run_id}"
        if project_run
        else resume_command(lost.run_id, project=False)
    )
    return f"{lost}. Once the server answers, continue it with: {again}"


def resume_command(run_id: str, project: bool) -> str:
    """The command that resumes `run_id` the way it was started: `mlflow run` in place (its
    own --run-id, so no new run is made), or this CLI."""
    if not project:
        return f"cifar-experiments train --resume {run_id}"
    from .tracking.past_runs import find_run

    env_manager = find_run(run_id).env_manager or "local"
    return (
        f"mlflow run {shlex.quote(os.getcwd())} --run-id {run_id} -P resume={run_id} "
        f"--env-manager {env_manager}"
    )


def _browse_run(run_id: str) -> str:
    return links.browse(links.run_page(run_id))
