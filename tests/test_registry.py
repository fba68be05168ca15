"""Registration after training and the `register` command, on real tiny runs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import CLASSES, IMAGES, TINY, encode

from cifar_experiments.cli import cli
from cifar_experiments.predictions import Predictions
from cifar_experiments.registry import CHAMPION

NAME = "tiny-classifier"
# A good recipe and a hopeless one, so validation accuracy differs between runs.
GOOD = ["--epochs", "3", "--lr", "0.05", "--batch-size", "4"]
BAD = ["--epochs", "1", "--lr", "0.00001", "--batch-size", "4"]


def train(image_folder, *args: str) -> str:
    result = CliRunner().invoke(
        cli,
        ["train", "--data", str(image_folder), "--val-fraction", "0.5", "--model-name", NAME,
         "--experiment-name", "reg", *args],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.stdout


def champion() -> mlflow.entities.model_registry.ModelVersion:
    return mlflow.MlflowClient().get_model_version_by_alias(NAME, CHAMPION)


def val_of(version: str) -> float:
    run_id = mlflow.MlflowClient().get_model_version(NAME, version).run_id
    return mlflow.get_run(run_id).data.metrics["val/best_accuracy"]


def test_champion_follows_the_better_validation_accuracy_and_stays_after_a_worse_run(
    image_folder,
):
    client = mlflow.MlflowClient()
    out = train(image_folder, *BAD)
    assert f"Registered {NAME} version 1; {CHAMPION} -> version 1" in out
    assert str(champion().version) == "1"

    train(image_folder, *GOOD)
    assert val_of("2") > val_of("1"), "the good recipe must beat the hopeless one"
    assert str(champion().version) == "2"

    out = train(image_folder, *BAD)
    assert val_of("3") < val_of("2")
    assert f"{CHAMPION} stays on version 2" in out
    assert str(champion().version) == "2"

    versions = client.search_model_versions(f"name = '{NAME}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2", "3"]
    for version in versions:
        run = mlflow.get_run(version.run_id)
        assert version.tags["run_id"] == version.run_id
        assert version.tags["model"] == "tutorial"
        assert version.tags["epochs"] == run.data.params["epochs"]
        assert float(version.tags["val_accuracy"]) == pytest.approx(
            run.data.metrics["val/best_accuracy"]
        )
        assert float(version.tags["test_accuracy"]) == pytest.approx(
            run.data.metrics["test_accuracy"]
        )
        assert "Validation accuracy" in version.description


def test_no_register_leaves_the_registry_alone(image_folder):
    train(image_folder, *BAD, "--no-register")
    assert mlflow.MlflowClient().search_registered_models() == []


def test_register_command_picks_the_best_finished_run_once(image_folder):
    train(image_folder, *BAD, "--no-register")
    train(image_folder, *GOOD, "--no-register")
    runs = mlflow.search_runs(experiment_names=["reg"], output_format="list")
    best = max(runs, key=lambda r: r.data.metrics["val/best_accuracy"])

    runner = CliRunner()
    result = runner.invoke(cli, ["register", "--experiment", "reg", "--model-name", NAME])
    assert result.exit_code == 0, result.output
    assert f"Best run of 'reg': {best.info.run_id}" in result.stdout
    assert champion().run_id == best.info.run_id

    again = runner.invoke(cli, ["register", "--experiment", "reg", "--model-name", NAME])
    assert again.exit_code == 0 and "already champion" in again.stdout
    assert len(mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'")) == 1


@pytest.mark.parametrize("experiment", ["nowhere", "Default"])
def test_register_command_without_a_finished_training_says_so(experiment):
    mlflow.MlflowClient().search_experiments()  # creates the store and its Default experiment
    result = CliRunner().invoke(cli, ["register", "--experiment", experiment])
    assert result.exit_code == 1
    assert experiment in result.output and "Traceback" not in result.output


def test_a_registration_that_fails_after_training_is_one_line_and_register_retries(
    image_folder, monkeypatch
):
    from mlflow.exceptions import MlflowException

    from cifar_experiments import registry

    register_run = registry.register_run

    def server_down(run_id, name, rule, alpha):
        raise MlflowException("API request to the registry failed with 503")

    monkeypatch.setattr(registry, "register_run", server_down)
    result = CliRunner().invoke(
        cli, ["train", "--data", str(image_folder), "--epochs", "1", "--model-name", NAME]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED"  # the training did finish
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: Registering the model failed: API request")
    retry = f"cifar-experiments register --run-id {run.info.run_id} --model-name {NAME}"
    assert error.endswith(f"Retry with: {retry}")

    monkeypatch.setattr(registry, "register_run", register_run)
    again = CliRunner().invoke(cli, retry.split()[1:])
    assert again.exit_code == 0, again.output
    assert "version 1; champion -> version 1" in again.output
    assert champion().run_id == run.info.run_id


def test_a_registry_error_is_not_taken_for_a_first_registration(monkeypatch):
    from mlflow.exceptions import MlflowException

    from cifar_experiments import registry

    class BrokenClient:
        def search_model_versions(self, query):
            raise MlflowException("the registry's database is down")

    with pytest.raises(MlflowException, match="database is down"):
        registry._version_of_model(BrokenClient(), NAME, "0" * 32, epoch=None)


QUOTED = 'm\'o "d" ü \\ ..'


def test_names_with_quotes_backslashes_and_unicode_work_exactly_as_given(image_folder):
    """Neither name may be pasted into a filter string: MLflow's cannot quote this one."""
    for _ in range(2):
        result = CliRunner().invoke(
            cli, ["train", *TINY, "--data", str(image_folder), "--model-name", QUOTED,
                  "--experiment-name", QUOTED, "--gate", "better"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(QUOTED)
    runs = client.search_runs([experiment.experiment_id])
    first, second = (client.get_model_version(QUOTED, version) for version in ("1", "2"))
    assert {first.run_id, second.run_id} == {run.info.run_id for run in runs}
    assert second.tags["gate.verdict"] in ("promoted", "kept")

    again = CliRunner().invoke(cli, ["register", "--run-id", first.run_id, "--model-name", QUOTED])
    assert again.exit_code == 0, again.output
    assert f"Registered {QUOTED} version 1;" in again.output, "already registered: not twice"


# (option, value, what the one-line refusal says), each before any training starts.
BAD_NAMES = {
    "a model name with a slash": ("--model-name", "a/b", "without / or :"),
    "a 300-character model name": ("--model-name", "m" * 300, "1 to 256 characters"),
    "a 300-character experiment": ("--experiment-name", "e" * 300, "1 to 256 characters"),
    "a 300-character run name": ("--run-name", "r" * 300, "1 to 250 characters"),
}


@pytest.mark.parametrize(("option", "value", "message"), BAD_NAMES.values(), ids=BAD_NAMES)
def test_names_the_registry_or_a_server_cannot_hold_are_refused_before_training(
    image_folder, option, value, message
):
    result = CliRunner().invoke(cli, ["train", *TINY, "--data", str(image_folder), option, value])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty


INJECTED = "' or '1'='1"
RUN_ID_COMMANDS = {
    "register": ["register", "--run-id", INJECTED],
    "compare": ["compare", INJECTED, "0" * 32],
    "resume": ["train", "--resume", INJECTED],
}


@pytest.mark.parametrize("args", RUN_ID_COMMANDS.values(), ids=RUN_ID_COMMANDS)
def test_a_run_id_that_reads_like_a_filter_is_refused_in_one_line(tracking_store, args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert INJECTED in errors[0], "the line names what was refused"


def logged_models_of(run: mlflow.entities.Run) -> list[mlflow.entities.LoggedModel]:
    return mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )


def only_run_of_reg() -> mlflow.entities.Run:
    (run,) = mlflow.search_runs(experiment_names=["reg"], output_format="list")
    return run


def test_each_epoch_is_a_model_of_the_run_with_its_metrics_and_the_best_are_kept(image_folder):
    train(image_folder, "--epochs", "5", "--lr", "0.05", "--batch-size", "4",
          "--keep-models", "2", "--no-register")  # fmt: skip
    run = only_run_of_reg()
    client = mlflow.MlflowClient()
    curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/accuracy")}
    best_two = sorted(curve, key=lambda epoch: (-curve[epoch], epoch))[:2]
    models = logged_models_of(run)
    epochs = {int(m.tags["epoch"]): m for m in models if "epoch" in m.tags}
    assert sorted(epochs) == sorted(best_two)
    for epoch, model in epochs.items():
        assert model.name == f"epoch-{epoch}"
        linked = {(m.key, m.step): m.value for m in model.metrics}
        assert linked[("val/accuracy", epoch)] == curve[epoch]
        assert {step for _, step in linked} == {epoch}
    # The run's own model stays, and the dropped epochs' files are gone, not only marked.
    assert [m.name for m in models if "epoch" not in m.tags] == ["model"]
    folder = Path(run.info.artifact_uri.removeprefix("file://")).parents[1] / "models"
    assert len(list(folder.glob("*/artifacts/MLmodel"))) == 3


def saved(uri: str) -> Predictions:
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        return Predictions.from_bytes(Path(path).read_bytes())


def test_register_names_an_epoch_of_a_run_and_the_gate_judges_it_on_its_predictions(
    image_folder,
):
    train(image_folder, *GOOD)  # version 1, champion
    run = only_run_of_reg()
    runner = CliRunner()
    result = runner.invoke(cli, ["register", "--run-id", run.info.run_id, "--epoch", "1",
                                 "--model-name", NAME])  # fmt: skip
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient()
    version = client.get_model_version(NAME, "2")
    epoch_1 = next(m for m in logged_models_of(run) if m.tags.get("epoch") == "1")
    assert version.source == f"models:/{epoch_1.model_id}" and version.tags["epoch"] == "1"
    curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/accuracy")}
    assert float(version.tags["val_accuracy"]) == pytest.approx(curve[1])
    # Compared image by image with the champion (the run's own model), on the epoch's own
    # predictions, saved beside its weights.
    assert version.tags["gate.compared_with"] == "1"
    epoch_says = saved(f"{epoch_1.artifact_location}/artifacts/predictions.npz")
    run_says = saved(f"{run.info.artifact_uri}/evaluation/val/predictions.npz")
    assert (epoch_says.example_ids == run_says.example_ids).all()
    only_epoch = int((epoch_says.right & ~run_says.right).sum())
    only_run = int((run_says.right & ~epoch_says.right).sum())
    assert only_epoch + only_run > 0  # epoch 1 is not the kept epoch 3
    assert version.tags["gate.discordant"] == f"{only_epoch}/{only_run}"
    served = mlflow.pyfunc.load_model(f"models:/{NAME}/2")
    answer = served.predict(pd.DataFrame({"image": [encode(IMAGES[0], "PNG")]}))
    assert answer["label"][0] in CLASSES

    again = runner.invoke(cli, ["register", "--run-id", run.info.run_id, "--epoch", "1",
                                "--model-name", NAME])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2

    missing = runner.invoke(cli, ["register", "--run-id", run.info.run_id, "--epoch", "9",
                                  "--model-name", NAME])  # fmt: skip
    assert missing.exit_code == 1
    assert missing.output.strip().splitlines() == [
        f"Error: run {run.info.run_id} has no model of epoch 9: it keeps those of epochs "
        "1, 2, 3 (--keep-models keeps the best)"
    ]
