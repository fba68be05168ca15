"""Every MLflow call of a training run lives here: `MlflowTracker` records a run behind the
`callbacks.Tracker` interface, and `mlflow_run` starts and always ends one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import socket
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
import torch
from filelock import FileLock
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException

from . import serving
from .callbacks import Tracker
from .config import TrainConfig
from .data import Dataset, ImageSet
from .engine import TrainingState
from .evaluation import Evaluation
from .interrupts import Interrupted

log = logging.getLogger(__name__)
T = TypeVar("T")

WEIGHTS_FILE = "cifar_net.pth"
# The run-level figure that model selection reads: validation accuracy of the kept epoch.
BEST_VAL_METRIC = "val/best_accuracy"
MODEL_NAME = "model"
# Set by `mlflow run` for the process it starts: the run it made for us to fill in.
PROJECT_RUN_ENV = "MLFLOW_RUN_ID"
ERROR_TAG = "error"
SQLITE_PREFIX = "sqlite:///"
# Where the run keeps its training state on this machine, and who is running it.
CHECKPOINT_TAG = "checkpoint"
PROCESS_TAG = "process"
CHECKPOINT_ARTIFACT_DIR = "checkpoint"
# The validation confusion matrix of each epoch, as an image with a step.
EPOCH_CONFUSION_KEY = "val_confusion_matrix"
# MLflow's UI opens an experiment in its GenAI mode unless told it is for model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# Without this in the address, the UI shows its GenAI pages to a browser that last used them.
TRAINING_VIEW = "?workflowType=machine_learning"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` listens unless told otherwise
NEW_GRANT_SECONDS = 10  # how long a refusal in a new experiment may be a grant on its way


class TrackingError(ValueError):
    """The tracking store cannot be used, or lacks what was asked of it."""


class ServerLost(TrackingError):
    """The tracking server stopped answering during a run, for longer than MLflow retries
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES); the run's checkpoint, if it has one, is kept."""

    def __init__(self, run_id: str, checkpoint: Path | None, error: MlflowException) -> None:
        self.run_id = run_id
        self.checkpoint = checkpoint if checkpoint is not None and checkpoint.is_file() else None
        kept = (
            f"its checkpoint is in {self.checkpoint}"
            if self.checkpoint is not None
            else "it stopped before its first checkpoint"
        )
        super().__init__(
            f"lost the tracking server {tracking_uri()} ({_why_unanswered(error)}) during run "
            f"{run_id}; {kept}"
        )


class MlflowTracker(Tracker):
    # Metrics are written in batches at most this often: one SQLite write costs milliseconds,
    # a training step less, and MLflow's own async queue competes with training for 2 cores.
    FLUSH_SECONDS = 5.0

    def __init__(self, run_id: str, resumed: bool = False) -> None:
        self.run_id = run_id
        self.checkpoint: Path | None = None
        self._pending: list[Metric] = []
        self._flushed_at = time.monotonic()
        # A resumed run may replay steps it logged before it stopped; each step is kept once.
        self._logged_through = _last_steps(run_id) if resumed else {}

    def record_checkpoint(self, path: Path) -> None:
        self.checkpoint = path
        mlflow.set_tag(CHECKPOINT_TAG, str(path))

    def log_params(self, params: dict[str, Any]) -> None:
        # `mlflow run` has already logged its entry-point parameters, as typed on its command
        # line ("1e-3"); logging "0.001" again would be refused as a change, so keep theirs.
        existing = mlflow.get_run(self.run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in existing})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self._pending += [
            Metric(k, float(v), timestamp, step)
            for k, v in metrics.items()
            if step > self._logged_through.get(k, -1)
        ]
        if time.monotonic() - self._flushed_at >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            client = mlflow.MlflowClient()
            # MLflow takes at most 1000 metrics a call.
            for start in range(0, len(self._pending), 1000):
                batch = self._pending[start : start + 1000]
                _with_retries(lambda batch=batch: client.log_batch(self.run_id, metrics=batch))
        self._pending = []
        self._flushed_at = time.monotonic()

    def log_dataset(self, dataset: Dataset) -> None:
        with warnings.catch_warnings():
            # MLflow registers two equivalent sources for local paths and warns that it picked one.
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            source = resolve_dataset_source(dataset.source)
        meta = MetaDataset(source=source, name=dataset.name, digest=dataset.digest)
        mlflow.log_input(meta, context="training")

    def on_epoch_end(self, state: TrainingState, epoch: int, metrics: dict[str, float]) -> None:
        super().on_epoch_end(state, epoch, metrics)
        if epoch > self._logged_through.get("val/accuracy", -1):
            self.log_confusion(state.last_val, epoch)

    def log_confusion(self, val: Evaluation, epoch: int) -> None:
        # One image per epoch under one key: the UI's image slider shows the matrix forming.
        figure = val.shares_figure(f"validation, epoch {epoch}")
        mlflow.log_image(_pixels(figure), key=EPOCH_CONFUSION_KEY, step=epoch)

    def log_evaluation(self, split: str, evaluation: Evaluation, images: ImageSet) -> None:
        folder = f"evaluation/{split}"
        mlflow.log_dict(evaluation.confusion_json(), f"{folder}/confusion_matrix.json")
        mlflow.log_dict(evaluation.report(), f"{folder}/classification_report.json")
        mlflow.log_text(evaluation.report_text(), f"{folder}/classification_report.txt")
        mlflow.log_table(evaluation.per_class_table(), f"{folder}/per_class.json")
        self.log_figure(
            evaluation.confusion_figure(f"{split} confusion matrix"),
            f"{folder}/confusion_matrix.png",
        )
        mistakes = evaluation.mistakes_figure(images.images.cpu().numpy(), f"{split} split")
        if mistakes is not None:
            self.log_figure(mistakes, f"{folder}/confident_mistakes.png")

    def log_figure(self, figure: Figure, path: str) -> None:
        mlflow.log_figure(figure, path)
        plt.close(figure)

    def log_model(
        self, weights: dict[str, torch.Tensor], settings: dict[str, Any], example_png: bytes
    ) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            weights_file = Path(tmp) / WEIGHTS_FILE
            torch.save(weights, weights_file)
            mlflow.log_artifact(str(weights_file))
            settings_file = Path(tmp) / "classifier.json"
            settings_file.write_text(json.dumps(settings))
            package = Path(__file__).parent
            mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(package / "pyfunc_entry.py"),
                artifacts={
                    serving.WEIGHTS_ARTIFACT: str(weights_file),
                    serving.SETTINGS_ARTIFACT: str(settings_file),
                },
                code_paths=[str(package)],
                signature=serving.signature(tuple(settings["classes"])),
                input_example=serving.example_input(example_png),
                pip_requirements=serving.pip_requirements(),
            )

    def set_description(self, markdown: str) -> None:
        mlflow.set_tag("mlflow.note.content", markdown)


def _pixels(figure: Figure) -> np.ndarray:
    """A figure drawn as RGB pixels, and closed."""
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return pixels


@contextmanager
def mlflow_run(
    config: TrainConfig, resume_run_id: str | None = None, tags: dict[str, str] | None = None
) -> Iterator[MlflowTracker]:
    """Start a run (or continue the one `mlflow run` made, or `resume_run_id`) and always end it.

    FINISHED on success; KILLED on Ctrl-C or SIGTERM; FAILED, with the error in a tag, on an
    exception. The run's last checkpoint, if any, is logged as an artifact on every path.
    """
    experiment = None
    if PROJECT_RUN_ENV not in os.environ and resume_run_id is None:
        experiment = _with_retries(lambda: mlflow.set_experiment(config.experiment_name))
    run = _once_granted(
        experiment,
        lambda: _with_retries(
            lambda: mlflow.start_run(
                run_id=resume_run_id, run_name=config.run_name, tags=tags, log_system_metrics=True
            )
        ),
    )
    mark_as_training(run.info.experiment_id)
    tracker = MlflowTracker(run.info.run_id, resumed=resume_run_id is not None)
    mlflow.set_tag(PROCESS_TAG, f"{socket.gethostname()}:{os.getpid()}")
    try:
        with _ended_as_it_goes(lambda status, error: _end(tracker, status, error)):
            yield tracker
    except MlflowException as error:
        if not server_lost(error):
            raise
        raise ServerLost(tracker.run_id, tracker.checkpoint, error) from None


@contextmanager
def _ended_as_it_goes(end: Callable[[int, BaseException | None], None]) -> Iterator[None]:
    """Call `end` with the status the block earns: FINISHED; KILLED on Ctrl-C or SIGTERM;
    FAILED, with the error, on an exception. When the block failed, a failure to end the run
    (the server gone, say) is a warning: the block's own error is the one to report."""
    try:
        yield
    except BaseException as error:
        interrupted = isinstance(error, KeyboardInterrupt | Interrupted)
        status = RunStatus.KILLED if interrupted else RunStatus.FAILED
        # The server has just failed a call after all MLflow's retries: try it once more only.
        with _one_try() if server_lost(error) else contextlib.nullcontext():
            try:
                end(status, error)
            except Exception as end_error:
                log.warning("Could not mark the run %s: %s", RunStatus.to_string(status),
                            _why_unanswered(end_error))  # fmt: skip
        raise
    else:
        end(RunStatus.FINISHED, None)


def server_lost(error: BaseException) -> bool:
    """Whether `error` is the tracking server not answering, or failing, after MLflow's
    retries: no connection, a timeout, or a 5xx answer (its database down, say)."""
    if not isinstance(error, MlflowException):
        return False
    return error.message.startswith("API request to ") or error.get_http_status_code() >= 500


def _why_unanswered(error: BaseException) -> str:
    """The gist of an HTTP failure: MLflow's message nests urllib3's, which nests its cause."""
    message = getattr(error, "message", None) or str(error)
    for pattern in (
        r"\[Errno -?\d+\] ([^\"')]+)",  # the OS's: connection refused, no route to host
        r"ResponseError\('([^']+)'",  # urllib3's: too many 503 error responses
        r"ProtocolError\('([^'.]+)",  # the server gone mid-request: connection aborted
    ):
        found = re.search(pattern, message)
        if found:
            return found.group(1).strip().lower()
    if "timeout" in message.lower():
        return "no answer in time"
    return " ".join(message.split())[:200]


@contextmanager
def _one_try() -> Iterator[None]:
    """MLflow's HTTP requests in the block are tried once, and wait at most 10 s."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {name: os.environ.get(name) for name in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_parent_run(experiment_name: str, run_name: str) -> str:
    """A run to nest others under. Made with the client, not made active: the runs nested
    under it may start in this process too."""
    experiment = _with_retries(lambda: mlflow.set_experiment(experiment_name))
    client = mlflow.MlflowClient()
    run = _once_granted(
        experiment, lambda: client.create_run(experiment.experiment_id, run_name=run_name)
    )
    return run.info.run_id


def mark_as_training(experiment_id: str) -> None:
    """Tag the experiment as one of model training, so the UI opens it on its runs; a kind
    someone set already is theirs to keep."""
    client = mlflow.MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def run_page(run_id: str) -> str:
    """The UI page of a run, in the model-training view; see `browse`."""
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return f"#/experiments/{experiment_id}/runs/{run_id}{TRAINING_VIEW}"


def model_version_page(name: str, version: str) -> str:
    return f"#/models/{urllib.parse.quote(name)}/versions/{version}"


def browse(page: str) -> str:
    """How to see `page` of the UI: the tracking server's own address, or, for a store on this
    machine, the command that starts the UI and the address it will answer at."""
    uri = mlflow.get_tracking_uri()
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https"):
        # Credentials never travel in the address: each user sets MLFLOW_TRACKING_USERNAME.
        server = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="")
        return f"open {server.geturl().rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri()}, then open {UI_ADDRESS}/{page}"


def experiment_of(run_id: str) -> str:
    """The name of the experiment that holds `run_id`."""
    client = mlflow.MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


@contextmanager
def holding(run_id: str) -> Iterator[None]:
    """`run_id` is RUNNING while the block runs, then ends as it went (see mlflow_run)."""
    client = mlflow.MlflowClient()
    client.update_run(run_id, status="RUNNING")

    def end(status: int, error: BaseException | None) -> None:
        if error is not None:
            client.set_tag(run_id, ERROR_TAG, _error_text(error))
        client.set_terminated(run_id, RunStatus.to_string(status))

    with _ended_as_it_goes(end):
        yield


def _error_text(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt | Interrupted):
        return str(error) or "interrupted"
    return f"{type(error).__name__}: {error}"[:5000]


def _end(tracker: MlflowTracker, status: int, error: BaseException | None) -> None:
    try:
        tracker.flush()
        if error is not None:
            mlflow.set_tag(ERROR_TAG, _error_text(error))
        if tracker.checkpoint is not None and tracker.checkpoint.is_file():
            mlflow.log_artifact(str(tracker.checkpoint), CHECKPOINT_ARTIFACT_DIR)
    finally:
        mlflow.end_run(RunStatus.to_string(status))


@dataclass(frozen=True)
class PastRun:
    """What resuming needs to know of an earlier run."""

    run_id: str
    status: str
    checkpoint: Path | None
    process: str | None  # "host:pid" of the process that last ran it
    env_manager: str | None  # how `mlflow run` made its environment, if it started the run


def find_run(run_id: str) -> PastRun:
    """Look up a run to resume; raises TrackingError when there is no such run."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as error:
        raise TrackingError(f"no run {run_id} in {tracking_uri()}") from error
    tags = run.data.tags
    path = tags.get(CHECKPOINT_TAG)
    return PastRun(
        run_id,
        run.info.status,
        Path(path) if path else None,
        tags.get(PROCESS_TAG),
        tags.get("mlflow.project.env"),
    )


def download_checkpoint(run_id: str, destination: Path) -> Path | None:
    """The run's last checkpoint from its artifacts, for when the local file is gone."""
    client = mlflow.MlflowClient()
    logged = [f.path for f in client.list_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR)]
    if not logged:
        return None
    destination.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, logged[0], str(destination)))


def check_store() -> None:
    """Fail in seconds, before any data is read, when the tracking store cannot be reached.

    MLflow would otherwise retry an unanswering server for minutes, at the first metric.
    """
    try:
        with _one_try(), _first_use_lock():
            mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # each store type fails in its own way
        if getattr(error, "error_code", None) == "UNAUTHENTICATED":
            raise TrackingError(_unauthenticated()) from None
        raise TrackingError(
            f"cannot reach the MLflow tracking store {tracking_uri()}: "
            f"{getattr(error, 'message', None) or error}"
        ) from error


def _unauthenticated() -> str:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user is None:
        return (
            f"the tracking server {tracking_uri()} needs a login: set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD"
        )
    return (
        f"the tracking server {tracking_uri()} refused the login of {user!r}: check "
        "MLFLOW_TRACKING_PASSWORD"
    )


def check_can_train_in(experiment_name: str) -> None:
    """Fail before any data is read when this login may not add runs to the experiment.

    The probe is a write that changes nothing (the experiment's kind, set to what it is): a
    server with logins checks it against the same EDIT permission as creating a run. A new
    experiment needs no probe: whoever creates one may write to it.
    """
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return
    kind = experiment.tags.get(EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    try:
        _once_granted(
            experiment,
            lambda: _with_retries(
                lambda: client.set_experiment_tag(
                    experiment.experiment_id, EXPERIMENT_KIND_TAG, kind
                )
            ),
        )
    except MlflowException as error:
        if error.error_code != "PERMISSION_DENIED":
            raise
        who = os.environ.get("MLFLOW_TRACKING_USERNAME", "this login")
        raise TrackingError(
            f"{who} may not add runs to experiment {experiment_name!r} on {tracking_uri()}: "
            "that needs EDIT permission on it, which its owner or an admin can grant"
        ) from None


def _first_use_lock() -> contextlib.AbstractContextManager:
    """For a SQLite store, a lock file beside it: the first use of a new store creates its
    tables, and trainings started together would otherwise all try (and all but one fail)."""
    database = sqlite_file()
    if database is None or not database.parent.is_dir():
        return contextlib.nullcontext()  # MLflow's own error will name the missing folder
    return FileLock(f"{database}.lock", timeout=300)


def _last_steps(run_id: str) -> dict[str, int]:
    client = mlflow.MlflowClient()
    return {
        key: max(m.step for m in client.get_metric_history(run_id, key))
        for key in client.get_run(run_id).data.metrics
    }


def _with_retries(call: Callable[[], T], attempts: int = 8) -> T:
    """`call`, tried again with growing pauses while SQLite reports its database locked:
    several trainings writing to one SQLite file take turns, and each waits only 5 s."""
    for attempt in range(attempts - 1):
        try:
            return call()
        except Exception as error:
            if "database is locked" not in str(error):
                raise
            pause = 0.5 * 2**attempt * (1 + random.random())
            log.warning("The tracking store is busy; retrying in %.1f s", pause)
            time.sleep(pause)
    return call()


def _once_granted(experiment: mlflow.entities.Experiment | None, call: Callable[[], T]) -> T:
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


def _made_just_now(experiment: mlflow.entities.Experiment | None) -> bool:
    return experiment is not None and time.time() - (experiment.creation_time or 0) / 1000 < 60


def mark_project_run_failed(message: str) -> None:
    """Under `mlflow run`, say on its run why we refused to start (it marks it FAILED)."""
    run_id = os.environ.get(PROJECT_RUN_ENV)
    if run_id:
        mlflow.MlflowClient().set_tag(run_id, ERROR_TAG, message)


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
