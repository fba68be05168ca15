"""The tracking store: where it is, whether it answers and lets this login write, the
experiments runs go in, and the retries that several writers at once need."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import mlflow
from filelock import FileLock
from mlflow.entities import Experiment
from mlflow.exceptions import MlflowException

from ..processes import one_line
from .keys import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from .refusals import said

log = logging.getLogger(__name__)
T = TypeVar("T")

SQLITE_PREFIX = "sqlite:///"
NEW_GRANT_SECONDS = 10  # how long a refusal in a new experiment may be a grant on its way


class TrackingError(ValueError):
    """The tracking store cannot be used, or lacks what was asked of it."""


def tracking_uri() -> str:
    """The store's URI, absolute, so the UI command works from any directory."""
    database = sqlite_file()
    return f"{SQLITE_PREFIX}{database}" if database is not None else mlflow.get_tracking_uri()


def sqlite_file() -> Path | None:
    """The database file of a SQLite store, absolute; None for other stores."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(uri.removeprefix(SQLITE_PREFIX)).resolve()


def check_store() -> None:
    """Fail in seconds, before any data is read, when the tracking store cannot be reached.

    MLflow would otherwise retry an unanswering server for minutes, at the first metric.
    """
    try:
        with one_try(), _first_use_lock():
            mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # each store type fails in its own way
        raise TrackingError(
            said(error)
            or f"cannot reach the MLflow tracking store {tracking_uri()}: {one_line(error)}"
        ) from None


def check_can_train_in(experiment_name: str) -> None:
    """Fail before any data is read when this login may not add runs to the experiment.

    The probe is a write that changes nothing (the experiment's kind, set to what it is): a
    server with logins checks it against the same EDIT permission as creating a run. A new
    experiment needs no probe: whoever creates one may write to it.
    """
    client = mlflow.MlflowClient()
    try:
        experiment = client.get_experiment_by_name(experiment_name)
    except MlflowException as error:  # a login with no permission at all may not even look
        if error.error_code != "PERMISSION_DENIED":
            raise
        raise TrackingError(_may_not_train_in(experiment_name)) from None
    if experiment is None:
        return
    kind = experiment.tags.get(EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    try:
        once_granted(
            experiment,
            lambda: with_retries(
                lambda: client.set_experiment_tag(
                    experiment.experiment_id, EXPERIMENT_KIND_TAG, kind
                )
            ),
        )
    except MlflowException as error:
        if error.error_code != "PERMISSION_DENIED":
            raise
        raise TrackingError(_may_not_train_in(experiment_name)) from None


def _may_not_train_in(experiment_name: str) -> str:
    who = os.environ.get("MLFLOW_TRACKING_USERNAME", "this login")
    return (
        f"{who} may not add runs to experiment {experiment_name!r} on {tracking_uri()}: "
        "that needs EDIT permission on it, which its owner or an admin can grant"
    )


def mark_as_training(experiment_id: str) -> None:
    """Tag the experiment as one of model training, so the UI opens it on its runs; a kind
    someone set already is theirs to keep."""
    client = mlflow.MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def experiment_of(run_id: str) -> str:
    """The name of the experiment that holds `run_id`."""
    client = mlflow.MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def one_try() -> contextlib.AbstractContextManager[None]:
    """MLflow's HTTP requests in the block are tried once, and wait at most 10 s."""
    return settings(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")


@contextmanager
def settings(**variables: str) -> Iterator[None]:
    """MLflow reads these environment variables as the block runs; as they were after it."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _first_use_lock() -> contextlib.AbstractContextManager[object]:
    """For a SQLite store, a lock file beside it: the first use of a new store creates its
    tables, and trainings started together would otherwise all try (and all but one fail)."""
    database = sqlite_file()
    if database is None or not database.parent.is_dir():
        return contextlib.nullcontext()  # MLflow's own error will name the missing folder
    return FileLock(f"{database}.lock", timeout=300)


# What writers at once meet: SQLite's lock (each waits only 5 s), and a row that another
# writer inserted between MLflow's look for it and its own insert (a dataset that trainings
# started together all log: MLflow's server then answers with the database's own refusal).
CONTENDED = (
    "database is locked",
    "UNIQUE constraint failed",
    "duplicate key value violates unique constraint",
)


def with_retries(call: Callable[[], T], attempts: int = 8) -> T:
    """`call`, tried again with growing pauses while the store is contended (CONTENDED):
    several trainings writing to one store take turns."""
    for attempt in range(attempts - 1):
        try:
            return call()
        except Exception as error:
            if not any(sign in str(error) for sign in CONTENDED):
                raise
            pause = 0.5 * 2**attempt * (1 + random.random())
            log.warning("The tracking store is busy; retrying in %.1f s", pause)
            time.sleep(pause)
    return call()


def once_granted(experiment: Experiment | None, call: Callable[[], T]) -> T:
    """`call`, tried again for up to NEW_GRANT_SECONDS while refused in an experiment made in
    the last minute. MLflow's auth app commits a new experiment, then grants its creator
    MANAGE on it: meanwhile the creator's other processes (trainings started together) find
    the experiment and are refused in it."""
    deadline = time.monotonic() + NEW_GRANT_SECONDS
    while True:
        try:
            return call()
        except MlflowException as error:
            refused = error.error_code == "PERMISSION_DENIED"
            if not (refused and _made_just_now(experiment) and time.monotonic() < deadline):
                raise
            time.sleep(0.5)


def _made_just_now(experiment: Experiment | None) -> bool:
    return experiment is not None and time.time() - (experiment.creation_time or 0) / 1000 < 60
