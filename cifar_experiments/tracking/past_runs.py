"""What later work reads of an earlier run: what resuming needs and its checkpoint when the
local file is gone, and the predictions it saved for each image of a split."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModel
from mlflow.exceptions import MlflowException

from ..predictions import FILE as PREDICTIONS_FILE
from ..predictions import Predictions
from .keys import (
    CHECKPOINT_ARTIFACT_DIR,
    CHECKPOINT_TAG,
    EPOCH_TAG,
    LAUNCH_TAG,
    MODEL_NAME,
    PROCESS_TAG,
)
from .refusals import NOT_FOUND
from .store import TrackingError, settings, tracking_uri


@dataclass(frozen=True)
class PastRun:
    run_id: str
    status: str
    checkpoint: Path | None  # as its tag names it: anyone who may edit the run can change it
    checkpoint_dir: str | None  # as the run logged it (a parameter, which cannot change)
    process: str | None  # "host:pid" of the process that last ran it
    env_manager: str | None  # how `mlflow run` made its environment, if it started the run


def launched_as(launch: str) -> str | None:
    """The run that torchrun launch `launch` started before torchrun restarted it, if any."""
    if not launch.replace("-", "").replace("_", "").isalnum():  # it goes into a filter
        return None
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.{LAUNCH_TAG} = '{launch}'",
        output_format="list",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def find_run(run_id: str) -> PastRun:
    """Look up a run to resume; raises TrackingError when there is no such run."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as error:
        if error.error_code not in NOT_FOUND:
            raise  # the server's own failure, said as such
        raise TrackingError(f"no run {run_id} in {tracking_uri()}") from error
    tags = run.data.tags
    path = tags.get(CHECKPOINT_TAG)
    return PastRun(
        run_id,
        run.info.status,
        Path(path) if path else None,
        run.data.params.get("checkpoint_dir"),
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


def saved_predictions(run_id: str, split: str) -> Predictions | None:
    """What the run's model answered for each image of `split` ("val" or "test"); None for a
    run that saved none (trained before runs saved them, or with no such split)."""
    client = mlflow.MlflowClient()
    folder = f"evaluation/{split}"
    path = f"{folder}/{PREDICTIONS_FILE}"
    if path not in {f.path for f in client.list_artifacts(run_id, folder)}:
        return None
    # A file of kilobytes: no progress bar in the middle of what the command prints.
    quiet = settings(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    with quiet, tempfile.TemporaryDirectory() as tmp:
        saved = Path(client.download_artifacts(run_id, path, tmp))
        return Predictions.from_bytes(saved.read_bytes())


def epoch_models(run_id: str) -> dict[int, tuple[str, float]]:
    """The run's epoch models, by epoch: each one's model id and validation accuracy."""
    found = {}
    for model in logged_models(run_id):
        epoch = model.tags.get(EPOCH_TAG)
        accuracy = [m.value for m in model.metrics or [] if m.key == "val/accuracy"]
        if epoch is not None and accuracy:
            found[int(epoch)] = (model.model_id, accuracy[-1])
    return found


def logged_models(run_id: str) -> list[LoggedModel]:
    run = mlflow.get_run(run_id)
    return mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )


def model_of(run_id: str, epoch: int | None = None) -> LoggedModel | None:
    """The run's own model (the kept epoch's), or epoch `epoch`'s if the run kept it."""
    for model in logged_models(run_id):
        if (model.name == MODEL_NAME) if epoch is None else model.tags.get(EPOCH_TAG) == str(epoch):
            return model
    return None


def model_predictions(model: LoggedModel) -> Predictions | None:
    """What an epoch's model answered for each validation image, saved beside its weights."""
    uri = f"{model.artifact_location}/artifacts/{PREDICTIONS_FILE}"
    quiet = settings(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    with quiet, tempfile.TemporaryDirectory() as tmp:
        try:
            saved = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except (MlflowException, OSError):
            return None
        return Predictions.from_bytes(saved.read_bytes())


def data_source(run_id: str) -> str | None:
    """Where the run's data was read from (its logged dataset's source), if it logged one."""
    inputs = mlflow.MlflowClient().get_run(run_id).inputs
    for dataset_input in inputs.dataset_inputs if inputs else []:
        source = json.loads(dataset_input.dataset.source or "{}")
        if "uri" in source:
            return str(source["uri"]).removeprefix("file://")
    return None
