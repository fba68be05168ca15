"""The model registry: register a run's model, and move `champion` only to a better one.

Selection is on validation accuracy, never on test accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from .config import CHAMPION_ALIAS as CHAMPION
from .tracking.keys import BEST_VAL_METRIC


class RegistryError(ValueError):
    """Nothing suitable to register; the message says why."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    message: str  # what happened to the alias, and why


def register_run(run_id: str, name: str) -> Registration:
    """Register the model of a finished run as a new version of `name`.

    A run already registered under `name` is not registered twice; its version is reported.
    """
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    if BEST_VAL_METRIC not in run.data.metrics:
        raise RegistryError(f"run {run_id} has no {BEST_VAL_METRIC}: it is not a finished training")
    logged = run.outputs.model_outputs if run.outputs else []
    if not logged:
        raise RegistryError(f"run {run_id} logged no model")
    val = run.data.metrics[BEST_VAL_METRIC]
    test = run.data.metrics.get("test/accuracy")
    version = _version_of_run(client, name, run_id)
    if version is None:
        tags = {
            "run_id": run_id,
            "model": run.data.params.get("model", ""),
            "epochs": run.data.params.get("epochs", ""),
            "val_accuracy": f"{val:.6f}",
            "test_accuracy": "" if test is None else f"{test:.6f}",
        }
        source = f"models:/{logged[0].model_id}"
        version = str(mlflow.register_model(source, name, tags=tags).version)
        client.update_model_version(name, version, description=_description(run, val, test))
    return _crown_best(client, name, version, val)


class RegistrationFailed(Exception):
    """What was asked finished (`result`: a training's summary, a sweep's outcome), but
    registering run `run_id` did not; `cifar-experiments register` can try again."""

    def __init__(self, result: Any, run_id: str, name: str, reason: str) -> None:
        super().__init__(reason)
        self.result, self.run_id, self.name, self.reason = result, run_id, name, reason


def register_finished(result: Any, run_id: str, name: str) -> Registration:
    """`register_run` for the run that `result` finished; RegistrationFailed, carrying it,
    when the registry refuses or cannot be reached."""
    try:
        return register_run(run_id, name)
    except (MlflowException, RegistryError) as error:
        reason = getattr(error, "message", str(error))
        raise RegistrationFailed(result, run_id, name, reason) from error


def best_finished_run(experiment_name: str) -> str:
    """The ID of the experiment's finished training run with the best validation accuracy."""
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise RegistryError(f"there is no experiment {experiment_name!r}")
    runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.status = 'FINISHED' and metrics.`{BEST_VAL_METRIC}` > -1",
        order_by=[f"metrics.`{BEST_VAL_METRIC}` DESC", "attributes.start_time ASC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        raise RegistryError(f"experiment {experiment_name!r} has no finished training run")
    return runs[0].info.run_id


def _crown_best(client: mlflow.MlflowClient, name: str, version: str, val: float) -> Registration:
    """Point `champion` at the version with the best validation accuracy, and say how
    `version` fared.

    Trainings that finish together register together: each moves the alias, then looks again
    and moves it once more if a better version appeared meanwhile. The last to move it has
    seen every version registered before, so `champion` ends on the best one.
    """
    previous = _champion(client, name)
    best, best_val = _best_version(client, name)
    for _ in range(10):
        champion = _champion(client, name)
        if champion is None or str(champion.version) != best:
            client.set_registered_model_alias(name, CHAMPION, best)
        latest, latest_val = _best_version(client, name)
        if latest == best:
            break
        best, best_val = latest, latest_val
    if best != version:
        return Registration(
            name,
            version,
            f"{CHAMPION} stays on version {best}: its validation accuracy {best_val:.2%} is "
            f"not beaten by {val:.2%}",
        )
    if previous is not None and str(previous.version) == version:
        return Registration(name, version, f"version {version} is already {CHAMPION}")
    was = (
        f"beats version {previous.version}'s {float(previous.tags['val_accuracy']):.2%}"
        if previous is not None and "val_accuracy" in previous.tags
        else "first version"
    )
    return Registration(
        name, version, f"{CHAMPION} -> version {version} (validation accuracy {val:.2%}, {was})"
    )


def _best_version(client: mlflow.MlflowClient, name: str) -> tuple[str, float]:
    """The version with the best validation accuracy; the earliest of equals."""
    versions = client.search_model_versions(f"name = '{name}'")
    scored = [
        (float(v.tags["val_accuracy"]), -int(v.version), str(v.version))
        for v in versions
        if "val_accuracy" in v.tags
    ]
    val, _, version = max(scored)
    return version, val


def _champion(client: mlflow.MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        # MLflow answers "no such alias" with INVALID_PARAMETER_VALUE, not a 404.
        missing_alias = error.error_code == "INVALID_PARAMETER_VALUE" and "alias" in error.message
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or missing_alias:
            return None
        raise


def _version_of_run(client: mlflow.MlflowClient, name: str, run_id: str) -> str | None:
    # A search finds nothing (it does not fail) before the model's first version; any error
    # is real, and is passed on rather than taken for "not registered yet".
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return str(versions[0].version) if versions else None


def _description(run: mlflow.entities.Run, val: float, test: float | None) -> str:
    params = run.data.params
    test_text = f"{test:.2%}" if test is not None else "not measured (no test split)"
    return (
        f"`{params.get('model', '?')}` network trained {params.get('epochs', '?')} epochs "
        f"(batch {params.get('batch_size', '?')}, lr {params.get('lr', '?')}) in run "
        f"{run.info.run_id}. Validation accuracy {val:.2%}; test accuracy {test_text}. "
        "Input: a DataFrame column `image` of PNG or JPEG bytes."
    )
