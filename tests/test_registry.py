"""Registration after training and the `register` command, on real tiny runs."""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner

from cifar_experiments.cli import cli
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
            run.data.metrics["test/accuracy"]
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
