"""A run's life: started (or taken over from `mlflow run`, or resumed), and always ended with
the status it earned: FINISHED; KILLED on Ctrl-C or SIGTERM; FAILED, with the error in a tag."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from ..config import TrainConfig
from ..interrupts import Interrupted, interruption
from .keys import CHECKPOINT_ARTIFACT_DIR, ERROR_TAG, PARENT_TAG, PROCESS_TAG
from .outage import ServerLost, server_lost, why_unanswered
from .recorder import MlflowTracker
from .store import mark_as_training, once_granted, one_try, with_retries

log = logging.getLogger(__name__)


@contextmanager
def mlflow_run(
    config: TrainConfig,
    resume_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    project_run: str | None = None,
    node_id: str | None = None,
) -> Iterator[MlflowTracker]:
    """Start a run (or continue `resume_run_id`, or fill in `project_run`, the one `mlflow run`
    made) and always end it as it went (see `ended_as_it_goes`). The run's last checkpoint is
    then kept as `Keeping` says. This machine's system metrics go under `node_id`, if given,
    as those of other machines that train with it (`node_system_metrics`)."""
    run_id = resume_run_id or project_run
    if node_id is not None:
        mlflow.system_metrics.set_system_metrics_node_id(node_id)
    experiment = None
    if run_id is None:
        experiment = with_retries(lambda: mlflow.set_experiment(config.experiment_name))
    # A run says what it trains, whoever started it (`mlflow run` would name it at random);
    # a resumed run keeps its name.
    name = config.run_name or (None if resume_run_id else f"{config.model}-{config.epochs}-epochs")
    run = once_granted(
        experiment,
        lambda: with_retries(
            lambda: mlflow.start_run(
                run_id=run_id, run_name=name, tags=tags, log_system_metrics=True
            )
        ),
    )
    mark_as_training(run.info.experiment_id)
    if ERROR_TAG in run.data.tags:  # why it stopped last time: no longer so
        mlflow.MlflowClient().delete_tag(run.info.run_id, ERROR_TAG)
    child = PARENT_TAG in run.data.tags
    tracker = MlflowTracker(run.info.run_id, resumed=resume_run_id is not None, child=child)
    mlflow.set_tag(PROCESS_TAG, f"{socket.gethostname()}:{os.getpid()}")
    keeps = Keeping(config.keep_checkpoints, child=child)
    try:
        with ended_as_it_goes(lambda status, error: _end(tracker, status, error, keeps)):
            yield tracker
    except MlflowException as error:
        if not server_lost(error):
            raise
        raise ServerLost(tracker.run_id, tracker.checkpoint, error) from None


@contextmanager
def node_system_metrics(run_id: str, node_id: str | None) -> Iterator[None]:
    """This machine's system metrics, under `node_id`, in a run another machine records."""
    if node_id is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, node_id=node_id, resume_logging=True)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextmanager
def ended_as_it_goes(end: Callable[[int, BaseException | None], None]) -> Iterator[None]:
    """Call `end` with the status the block earns: FINISHED; KILLED on Ctrl-C or SIGTERM;
    FAILED, with the error, on an exception. When the block failed, a failure to end the run
    (the server gone, say) is a warning: the block's own error is the one to report."""
    try:
        yield
    except BaseException as error:
        stop = interruption(error)
        status = RunStatus.KILLED if stop is not None else RunStatus.FAILED
        # The server has just failed a call after all MLflow's retries: try it once more only.
        with one_try() if stop is None and server_lost(error) else contextlib.nullcontext():
            try:
                end(status, stop or error)
            except Exception as end_error:
                log.warning("Could not mark the run %s: %s", RunStatus.to_string(status),
                            why_unanswered(end_error))  # fmt: skip
        if stop is not None and stop is not error:
            raise stop from None  # the stop request itself, not the library error around it
        raise
    else:
        end(RunStatus.FINISHED, None)


@dataclass(frozen=True)
class Keeping:
    """What a run's last checkpoint is kept as once it ends. A stopped or failed run keeps
    its file and logs it as an artifact, to resume from here or elsewhere. A finished run has
    nothing to resume: it logs the artifact (a child run, one of many, not even that) and
    removes its file, unless asked to keep them (`--keep-checkpoints`)."""

    asked: bool
    child: bool  # a sweep's trial, a repeat

    def artifact(self, status: int) -> bool:
        return self.asked or status != RunStatus.FINISHED or not self.child

    def file(self, status: int) -> bool:
        return self.asked or status != RunStatus.FINISHED


def _end(tracker: MlflowTracker, status: int, error: BaseException | None, keeps: Keeping) -> None:
    try:
        tracker.flush()
        if error is not None:
            mlflow.set_tag(ERROR_TAG, _error_text(error))
        saved = tracker.checkpoint
        if saved is not None and saved.is_file():
            if keeps.artifact(status):
                mlflow.log_artifact(str(saved), CHECKPOINT_ARTIFACT_DIR)
            if not keeps.file(status):
                saved.unlink()  # after the artifact is safely logged: a failed upload keeps it
    finally:
        mlflow.end_run(RunStatus.to_string(status))


def _error_text(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt | Interrupted):
        return str(error) or "interrupted"
    return f"{type(error).__name__}: {error}"[:5000]


def start_parent_run(experiment_name: str, run_name: str) -> str:
    """A run to nest others under. Made with the client, not made active: the runs nested
    under it may start in this process too."""
    experiment = with_retries(lambda: mlflow.set_experiment(experiment_name))
    client = mlflow.MlflowClient()
    run = once_granted(
        experiment, lambda: client.create_run(experiment.experiment_id, run_name=run_name)
    )
    return run.info.run_id


@contextmanager
def holding(run_id: str) -> Iterator[None]:
    """`run_id` is RUNNING while the block runs, then ends as it went (see mlflow_run)."""
    client = mlflow.MlflowClient()
    client.update_run(run_id, status="RUNNING")

    def end(status: int, error: BaseException | None) -> None:
        if error is not None:
            client.set_tag(run_id, ERROR_TAG, _error_text(error))
        client.set_terminated(run_id, RunStatus.to_string(status))

    with ended_as_it_goes(end):
        yield


def mark_refused(run_id: str, message: str) -> None:
    """Say on a run `mlflow run` made why we refused to start in it (it marks it FAILED)."""
    mlflow.MlflowClient().set_tag(run_id, ERROR_TAG, message)
