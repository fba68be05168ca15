"""The model registry: register a run's model, and move `champion` through the gate
(gate.py): to a version that is better on the validation images both hold out.

Selection is on validation images, never on test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from . import gate
from .config import CHAMPION_ALIAS as CHAMPION
from .tracking.keys import BEST_VAL_METRIC, EPOCH_TAG, TEST_ACCURACY_METRIC
from .tracking.past_runs import epoch_models, model_of, model_predictions, saved_predictions
from .tracking.refusals import NOT_FOUND


class RegistryError(ValueError):
    """Nothing suitable to register; the message says why."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    message: str  # what happened to the alias, and why


def register_run(
    run_id: str, name: str, rule: str = "significant", alpha: float = 0.05,
    epoch: int | None = None,
) -> Registration:  # fmt: skip
    """Register the model of a finished run (or of its epoch `epoch`, if the run kept it) as a
    new version of `name`, and move `champion` to it if the gate (`rule` at level `alpha`, see
    gate.py) lets it.

    A model already registered under `name` is not registered twice; its version is reported.
    """
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    run_id = run.info.run_id  # the store's own id, as the searches below take it
    if BEST_VAL_METRIC not in run.data.metrics:
        raise RegistryError(f"run {run_id} has no {BEST_VAL_METRIC}: it is not a finished training")
    model = model_of(run_id, epoch)
    if model is None:
        raise RegistryError(_no_model(run_id, epoch))
    val = run.data.metrics[BEST_VAL_METRIC]
    test = run.data.metrics.get(TEST_ACCURACY_METRIC)
    tags = {"run_id": run_id, "model": run.data.params.get("model", ""),
            "epochs": run.data.params.get("epochs", "")}  # fmt: skip
    if epoch is not None:  # an epoch's scores are its validation pass's; it has no test score
        val, test = epoch_models(run_id)[epoch][1], None
        tags[EPOCH_TAG] = str(epoch)
    version = _version_of_model(client, name, run_id, epoch)
    if version is None:
        tags.update({"val_accuracy": f"{val:.6f}",
                     "test_accuracy": "" if test is None else f"{test:.6f}"})  # fmt: skip
        version = str(mlflow.register_model(f"models:/{model.model_id}", name, tags=tags).version)
        description = _description(run, val, test, epoch)
        client.update_model_version(name, version, description=description)
        version = _one_version_of_model(client, name, run_id, epoch, version)
    return _through_gate(client, name, version, rule, alpha)


def _no_model(run_id: str, epoch: int | None) -> str:
    if epoch is None:
        return f"run {run_id} logged no model"
    kept = sorted(epoch_models(run_id))
    return (
        f"run {run_id} has no model of epoch {epoch}: it keeps those of epochs "
        f"{', '.join(map(str, kept)) or 'none'} (--keep-models keeps the best)"
    )


def _one_version_of_model(
    client: mlflow.MlflowClient, name: str, run_id: str, epoch: int | None, mine: str
) -> str:
    """Machines that finish a sweep together both register its best run, each having found it
    unregistered: the lowest version stands, and the others are deleted by whoever made them."""
    versions = _versions_of_model(client, name, run_id, epoch)
    first = str(min(int(v.version) for v in versions))
    if first != mine:
        client.delete_model_version(name, mine)
    return first


class RegistrationFailed(Exception):
    """What was asked finished (`result`: a training's summary, a sweep's outcome), but
    registering run `run_id` did not; `cifar-experiments register` can try again."""

    def __init__(self, result: Any, run_id: str, name: str, reason: str) -> None:
        super().__init__(reason)
        self.result, self.run_id, self.name, self.reason = result, run_id, name, reason


def register_finished(result: Any, run_id: str, name: str, rule: str, alpha: float) -> Registration:
    """`register_run` for the run that `result` finished; RegistrationFailed, carrying it,
    when the registry refuses or cannot be reached."""
    try:
        return register_run(run_id, name, rule, alpha)
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


def _through_gate(
    client: mlflow.MlflowClient, name: str, version: str, rule: str, alpha: float
) -> Registration:
    """Ask the gate whether `champion` moves to `version`, move it if so, and record why on the
    version (tags) and its run (the per-class table); then settle any race (`_settle`)."""
    candidate = _candidate(client, name, version)
    first_seen = _champion(client, name)
    decision = None
    for _ in range(10):  # another registration may move the alias between a look and a move
        holder = _champion(client, name)
        if holder is not None and str(holder.version) == version:
            break
        champion = _candidate(client, name, str(holder.version)) if holder is not None else None
        decision = gate.decide(rule, alpha, candidate, champion)
        if not decision.promotes:
            break
        client.set_registered_model_alias(name, CHAMPION, version)
    if decision is None:
        return Registration(name, version, f"version {version} is already {CHAMPION}")
    _record(client, name, version, decision)
    _settle(client, name, rule, alpha, int(first_seen.version) if first_seen else 0)
    return Registration(name, version, decision.line)


def _record(client: mlflow.MlflowClient, name: str, version: str, decision: gate.Decision) -> None:
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, version, key, value)
    if decision.comparison is not None:
        run_id = client.get_model_version(name, version).run_id
        artifact = f"gate/per_class_vs_version_{decision.compared_with}.json"
        mlflow.log_table(decision.comparison.table(), artifact, run_id=run_id)


def _settle(client: mlflow.MlflowClient, name: str, rule: str, alpha: float, since: int) -> None:
    """Registrations that finish together race: one may move the alias just after another
    looked at it. So each, once done, holds the champion against every version registered
    since the champion it first saw, and hands the alias to one the gate prefers. The last
    to finish has seen them all: no version of the race beats the champion it leaves."""
    for _ in range(10):
        holder = _champion(client, name)
        if holder is None:
            return
        rivals = [
            str(v.version)
            for v in _versions_since(client, name, since)
            if str(v.version) != str(holder.version) and not _refused_by(v, str(holder.version))
        ]
        if not rivals:
            return
        champion = _candidate(client, name, str(holder.version))
        for rival in sorted(rivals, key=int):
            decision = gate.decide(rule, alpha, _candidate(client, name, rival), champion)
            if decision.promotes:
                client.set_registered_model_alias(name, CHAMPION, rival)
                _record(client, name, rival, decision)
                break
        else:
            return


def _refused_by(version: ModelVersion, champion: str) -> bool:
    """Whether the gate already kept `champion` against `version`: asked again, it would say
    the same (a version that beat it, and lost the alias in a race, is asked again)."""
    tags = version.tags
    return tags.get(gate.COMPARED_WITH_TAG) == champion and tags.get(gate.VERDICT_TAG) in (
        "kept", "not_comparable",
    )  # fmt: skip


def _candidate(client: mlflow.MlflowClient, name: str, version: str) -> gate.Candidate:
    """A version as the gate sees it: its validation accuracy and its model's predictions on
    the validation images: its run's, if the run saved them; an epoch's, saved with it."""
    model_version = client.get_model_version(name, version)
    val = float(model_version.tags.get("val_accuracy", "nan"))
    run_id, source = model_version.run_id, model_version.source or ""
    predictions = None
    if EPOCH_TAG in model_version.tags and source.startswith("models:/"):
        predictions = model_predictions(client.get_logged_model(source.removeprefix("models:/")))
    elif run_id is not None:
        predictions = saved_predictions(run_id, "val")
    return gate.Candidate(version, val, predictions)


def run_of(reference: str) -> str:
    """The run behind a run id, `models:/NAME/VERSION` or `models:/NAME@ALIAS`; RegistryError
    in one line when there is none."""
    client = mlflow.MlflowClient()
    if not reference.startswith("models:/"):
        try:
            return client.get_run(reference).info.run_id
        except MlflowException as error:
            if error.error_code not in NOT_FOUND:
                raise  # the server's own failure, said as such
            raise RegistryError(f"there is no run {reference!r}") from None
    name, at, alias = reference.removeprefix("models:/").partition("@")
    if not at:
        name, _, alias = name.partition("/")
    try:
        found = (
            client.get_model_version_by_alias(name, alias)
            if at
            else client.get_model_version(name, alias)
        )
    except MlflowException as error:
        if error.error_code not in NOT_FOUND:
            raise
        raise RegistryError(f"there is no model {reference!r}") from None
    if found.run_id is None:
        raise RegistryError(f"model {reference!r} has no run behind it")
    return found.run_id


def promote(name: str, version: str) -> Registration:
    """Move `champion` to `version` by hand, past the gate; the version records it."""
    client = mlflow.MlflowClient()
    client.get_model_version(name, version)  # an unknown version is refused before anything moves
    holder = _champion(client, name)
    was = f" (it was version {holder.version})" if holder is not None else ""
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, gate.VERDICT_TAG, "manual")
    return Registration(name, version, f"{CHAMPION} -> version {version}, by hand{was}")


def _champion(client: mlflow.MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        # MLflow answers "no such alias" with INVALID_PARAMETER_VALUE, not a 404.
        missing_alias = error.error_code == "INVALID_PARAMETER_VALUE" and "alias" in error.message
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or missing_alias:
            return None
        raise


def _version_of_model(
    client: mlflow.MlflowClient, name: str, run_id: str, epoch: int | None
) -> str | None:
    # A search finds nothing (it does not fail) before the model's first version; any error
    # is real, and is passed on rather than taken for "not registered yet".
    versions = _versions_of_model(client, name, run_id, epoch)
    return str(versions[0].version) if versions else None


# A model's name is never pasted into a search: MLflow's filter strings have no way to quote
# one that holds both kinds of quote, and the name is the user's. Run ids are the store's.


def _versions_of_model(
    client: mlflow.MlflowClient, name: str, run_id: str, epoch: int | None
) -> list[ModelVersion]:
    """The versions of `name` made from the run's own model, or from its epoch `epoch`'s."""
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    epoch_tag = None if epoch is None else str(epoch)
    return [v for v in versions if v.name == name and v.tags.get(EPOCH_TAG) == epoch_tag]


def _versions_since(client: mlflow.MlflowClient, name: str, since: int) -> list[ModelVersion]:
    """The versions of `name` numbered above `since`, read one by one up to the newest."""
    newest = max((int(v.version) for v in client.get_registered_model(name).latest_versions),
                 default=since)  # fmt: skip
    versions = []
    for number in range(since + 1, newest + 1):
        try:
            versions.append(client.get_model_version(name, str(number)))
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":  # deleted: a duplicate of a run
                raise
    return versions


def _description(
    run: mlflow.entities.Run, val: float, test: float | None, epoch: int | None = None
) -> str:
    params = run.data.params
    test_text = f"{test:.2%}" if test is not None else "not measured (no test split)"
    trained = f"trained to epoch {epoch} of" if epoch is not None else "trained"
    return (
        f"`{params.get('model', '?')}` network {trained} {params.get('epochs', '?')} epochs "
        f"(batch {params.get('batch_size', '?')}, lr {params.get('lr', '?')}) in run "
        f"{run.info.run_id}. Validation accuracy {val:.2%}; test accuracy {test_text}. "
        "Input: a DataFrame column `image` of PNG or JPEG bytes."
    )
