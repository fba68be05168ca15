"""The project as `mlflow run` and a newcomer meet it: MLproject, conda.yaml, README, CI."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tomllib

import mlflow
import pytest
import yaml
from helpers import ROOT, local_env, mlflow_run_command, unavailable

from cifar_experiments.cli import train
from cifar_experiments.config import TrainConfig
from cifar_experiments.recipes import RECIPES


def entry_point(name: str = "main") -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][name]


def as_mlproject_default(default: object) -> object:
    """An option's default as MLproject writes it: true/false for a bool."""
    return str(default).lower() if isinstance(default, bool) else default


def test_mlproject_declares_the_config_options_with_their_defaults():
    """MLproject is written by hand; the CLI's options are made from the config's fields."""
    parameters = entry_point()["parameters"]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    # `mlflow run` logs every declared parameter: one without a default would be logged as a
    # placeholder, and recipe options as something other than the recipe's values. The
    # experiment is `mlflow run`'s own --experiment-name.
    no_default = {name for name, f in fields.items() if f.default is None}
    # How many processes train together is the command's own option, not the config's.
    launch = {"nproc_per_node": 1}
    assert set(parameters) == set(fields) - set(RECIPES["tutorial"]) - no_default - {
        "experiment_name"
    } | set(launch)
    assert {p.name: p.default for p in train.params if p.name in launch} == launch
    assert {p.name for p in train.params} >= set(parameters)
    for name, spec in parameters.items():
        assert f"--{name.replace('_', '-')} {{{name}}}" in entry_point()["command"], name
        default = launch[name] if name in launch else fields[name].default
        assert spec["default"] == as_mlproject_default(default), name


def test_no_entry_point_declares_a_placeholder():
    for name in ("main", "register", "sweep"):
        defaults = [spec["default"] for spec in entry_point(name)["parameters"].values()]
        assert "" not in defaults, name


def test_register_entry_point_passes_its_parameters_to_the_register_command():
    from cifar_experiments.cli import register

    spec = entry_point("register")
    assert set(spec["parameters"]) == {p.name for p in register.params} - {"run_id", "epoch"}
    for name, parameter in spec["parameters"].items():
        assert parameter["default"] == next(p.default for p in register.params if p.name == name)
        assert f"--{name.replace('_', '-')} {{{name}}}" in spec["command"]


def test_sweep_entry_point_passes_its_parameters_and_leaves_searchable_ones_undeclared():
    """A declared parameter reaches the CLI even at its default, so it would count as fixed
    for every trial: the searchable options must be left to `-P name=value`."""
    from cifar_experiments.cli import sweep
    from cifar_experiments.search_space import SEARCHABLE

    spec = entry_point("sweep")
    options = {p.name: p for p in sweep.params}
    assert set(spec["parameters"]) <= set(options)
    assert not set(spec["parameters"]) & set(SEARCHABLE)
    for name, parameter in spec["parameters"].items():
        assert f"--{name.replace('_', '-')} {{{name}}}" in spec["command"], name
        assert parameter["default"] == as_mlproject_default(options[name].default), name


def test_conda_env_installs_what_the_package_needs():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    pip = next(d["pip"] for d in conda if isinstance(d, dict))
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(pip) == sorted(package)
    assert "python=3.11" in conda


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    test_command = ci[-1]
    assert "pytest" in test_command and test_command in readme


@pytest.mark.slow
def test_mlflow_run_trains_into_the_run_it_made(image_folder, tracking_store, tmp_path):
    """End to end, as a user types it; lr spelt differently from how we would log it."""
    env = local_env(MLFLOW_TRACKING_URI=tracking_store)
    command = mlflow_run_command("--experiment-name", "project", epochs=1, lr="2e-2",
                                 batch_size=8, data=image_folder, augment="false")  # fmt: skip
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1, "the CLI must fill in the run `mlflow run` made, not start another"
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tutorial-1-epochs", "named as the CLI names it, not at random"
    assert run.data.params["lr"] == "2e-2"  # as `mlflow run` logged it
    assert run.data.params["batch_size"] == "8"
    assert run.data.params["momentum"] == str(RECIPES["tutorial"]["momentum"])  # the recipe's
    assert run.data.params["augment"] == "false"
    assert (run.data.params["device"], run.data.params["compute_device"]) == ("auto", "cpu")
    assert run.data.params["parameter_count"] == str(62006 - 7 * 85)
    assert "test_accuracy" in run.data.metrics
    placeholders = {k: v for k, v in run.data.params.items() if v in ("", "''", '""')}
    assert not placeholders
    assert "experiment_name" not in run.data.params  # the run is in "project", not "cifar10"
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.name == "project"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert re.search(rf"Run {run.info.run_id} finished: test accuracy", done.stdout)


@pytest.mark.slow
def test_mlflow_run_with_a_bad_value_fails_its_run_with_the_message(tracking_store, tmp_path):
    env = local_env(MLFLOW_TRACKING_URI=tracking_store)
    command = mlflow_run_command(epochs=0)
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert (
        "Invalid value for '--epochs'" in done.stderr
        and "Traceback" not in done.stderr.split("mlflow.exceptions")[0]
    )
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
    assert "--epochs" in run.data.tags["error"]


@pytest.mark.parametrize(
    ("ci", "outcome"), [("1", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_a_missing_service_fails_in_ci_and_is_skipped_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="headless Chromium: not installed"):
        unavailable("headless Chromium: not installed")
    assert "export CI=1" in (ROOT / ".ci" / "run").read_text(), "CI runs as CI"
