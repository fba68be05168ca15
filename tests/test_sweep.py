"""Sweeps: one parent run per study, a child run per trial, pruning, the best registered once,
workers on one study, Ctrl-C then continue, and bad input refused before any trial."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from helpers import (
    TINY,
    all_children,
    children,
    copy_of_store,
    local_env,
    mlflow_run_command,
    only_parent,
    point_mlflow_at,
    sweep_command,
    write_image_folder,
)

from cifar_experiments import optimization, search_space
from cifar_experiments.cli import cli
from cifar_experiments.config import SweepConfig, TrainConfig
from cifar_experiments.interrupts import StopRequests
from cifar_experiments.sweep import confirm, parent_run, workers
from cifar_experiments.sweep import study as sweep_study


def run_sweep(*args: str):
    return CliRunner().invoke(cli, ["sweep", *args], catch_exceptions=False)


def test_a_sweep_nests_its_trials_and_registers_only_the_best(image_folder, tmp_path, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 0.001, high: 0.3, log: true}\nmomentum: [0.8, 0.9]\n")
    drawings, draw = [], parent_run.draw

    def counted(*args) -> None:
        drawings.append(args)
        draw(*args)

    monkeypatch.setattr(parent_run, "draw", counted)
    result = run_sweep("--trials", "3", "--space", str(space), "--data", str(image_folder),
                       "--confirm-top", "0", *TINY)  # fmt: skip
    assert result.exit_code == 0, result.output

    parent = only_parent()
    trials = children(parent.info.run_id)
    assert [run.data.tags[parent_run.TRIAL_TAG] for run in trials] == ["0", "1", "2"]
    assert all(run.info.status == "FINISHED" for run in trials)
    assert all(run.data.tags[parent_run.STATE_TAG] == "complete" for run in trials)
    assert len({run.data.params["lr"] for run in trials}) == 3, "each trial tries its own lr"
    assert trials[0].data.params["lr"] == "0.07", "the first trial is the recipe's"
    assert {run.data.params["batch_size"] for run in trials} == {"8"}, "fixed for every trial"
    assert all(run.outputs.model_outputs for run in trials), "each trial logs its model"
    stored = [{f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
              for run in trials]  # fmt: skip
    assert not [files for files in stored if "cifar_net.pth" in files], "its weights only there"

    # The parent: the study's settings, the best so far per trial, the best trial's run.
    assert parent.info.status == "FINISHED"
    assert parent.data.params["trials"] == "3" and parent.data.params["sampler"] == "tpe"
    assert parent.data.params["space.lr"] == "0.001 to 0.3 (log)"
    vals = {run.info.run_id: run.data.metrics["val/best_accuracy"] for run in trials}
    best_run = max(trials, key=lambda run: (vals[run.info.run_id], -run.info.start_time))
    assert parent.data.tags["best_run_id"] == best_run.info.run_id
    history = mlflow.MlflowClient().get_metric_history(parent.info.run_id, parent_run.BEST_METRIC)
    assert [point.step for point in history] == [0, 1, 2]
    assert history[-1].value == max(vals.values())
    assert [p.value for p in history] == sorted(p.value for p in history), "best so far only rises"
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert "trials.csv" in artifacts
    plots = mlflow.MlflowClient().list_artifacts(parent.info.run_id, "plots")
    assert {f.path for f in plots} >= {"plots/optimization_history.png",
                                       "plots/param_importances.png"}  # fmt: skip
    assert len(drawings) == 1, "a sweep shorter than a minute draws its plots once, at its end"

    # Trials do not register; the sweep registers its best, once.
    (version,) = mlflow.MlflowClient().search_model_versions("name = 'cifar10-classifier'")
    assert version.run_id == best_run.info.run_id
    champion = mlflow.MlflowClient().get_model_version_by_alias("cifar10-classifier", "champion")
    assert champion.version == version.version
    assert f"Best: trial {best_run.data.tags[parent_run.TRIAL_TAG]}" in result.output
    parent_page = f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    assert f"then open http://127.0.0.1:5000/{parent_page}?workflowType=machine_learning" in (
        result.output
    )


def test_a_pruned_trial_stops_early_and_finishes_tagged_pruned(image_folder, monkeypatch):
    """The median pruner (told to judge after one trial) stops a trial that trails the first
    at the same epoch: its run ends FINISHED, with fewer epochs, tagged pruned."""
    monkeypatch.setattr(sweep_study, "STARTUP_TRIALS", 1)
    space = search_space.parse({"lr": {"low": 1e-7, "high": 0.5, "log": True}}, "test")
    base = TrainConfig(epochs=4, batch_size=8, data=str(image_folder), augment=False)
    plan = sweep_study.plan(
        SweepConfig(trials=3, sampler="random", confirm_top=0), vars(base).copy(), space
    )
    study = optuna.load_study(study_name=plan.study_name, storage=plan.storage)
    study.enqueue_trial({"lr": 0.1})  # after the recipe's own lr, another that learns
    study.enqueue_trial({"lr": 1e-7})  # and one that cannot
    outcome = workers.run(plan, StopRequests())

    assert outcome.states == {"complete": 2, "pruned": 1}
    recipe, good, hopeless = children(plan.parent_run_id)
    assert recipe.data.params["lr"] == str(base.lr), "the first trial is the recipe"
    assert hopeless.info.status == "FINISHED"
    assert hopeless.data.tags[parent_run.STATE_TAG] == "pruned"
    epochs = mlflow.MlflowClient().get_metric_history(hopeless.info.run_id, "val/accuracy")
    assert len(epochs) == sweep_study.warmup_epochs(4) < 4, "judged once its warm-up was over"
    assert good.data.tags[parent_run.STATE_TAG] == "complete"
    assert outcome.best_run_id in (recipe.info.run_id, good.info.run_id)


def test_a_failing_trial_is_marked_failed_with_its_reason_and_the_sweep_goes_on(
    image_folder, tmp_path
):
    space = tmp_path / "space.yaml"
    # Both values diverge (NaN loss) or cannot go together (Nesterov without momentum).
    space.write_text("lr: [1.0e+12]\nmomentum: [0.0]\nnesterov: [true, false]\n")
    result = run_sweep("--trials", "2", "--sampler", "grid", "--space", str(space),
                       "--data", str(image_folder), *TINY)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "nesterov: needs a momentum above 0" in result.output
    assert "No trial completed, so nothing is registered" in result.output
    parent = only_parent()
    (diverged,) = children(parent.info.run_id)  # the other trial never got as far as a run
    assert diverged.info.status == "FAILED" and diverged.data.tags[parent_run.STATE_TAG] == "failed"
    assert "training diverged" in diverged.data.tags["error"]
    study = optuna.load_study(study_name="cifar10-tutorial", storage=sweep_study.default_storage())
    reasons = sorted(t.user_attrs[sweep_study.FAILURE_ATTR] for t in study.trials)
    assert reasons[0].startswith("nesterov: needs a momentum") and "diverged" in reasons[1]
    assert not mlflow.MlflowClient().search_registered_models()


# (space file, options, what the one-line error says); no space file: the default space.
BAD_INPUT = {
    "an option no space can search": ("lrr: [0.1]", [], "cannot search lrr; searchable options"),
    "an option both fixed and searched": (
        "lr: [0.1, 0.2]",
        ["--lr", "0.1"],
        "--lr: fixed for every trial, and searched by the",
    ),
    "an empty range": ("lr: {low: 0.2, high: 0.1}", [], "lr: the range is empty"),
    "no trials": (None, ["--trials", "0"], "Invalid value for '--trials': must be at least 1"),
    "a grid over a float range": (None, ["--sampler", "grid"], "grid search: lr: a float range"),
    "no workers": (None, ["--workers", "0"], "Invalid value for '--workers'"),
}


def test_a_worker_that_fails_ends_the_sweep_with_its_reason_in_one_line(tmp_path):
    """An error no trial can catch (here: the images gone once the sweep was planned) ends the
    worker, and the parent names the worker and the error, not just an exit status."""
    folder = write_image_folder(tmp_path / "images", {"train": 20})
    base = TrainConfig(epochs=1, batch_size=8, data=str(folder))
    plan = sweep_study.plan(
        SweepConfig(trials=2, workers=2),
        vars(base).copy(),
        search_space.parse({"lr": [0.01, 0.02]}, "test"),
    )
    shutil.rmtree(folder)
    with pytest.raises(sweep_study.SweepError) as failure:
        workers.run(plan, StopRequests())
    assert re.fullmatch(r"worker-[01] failed \(exit status 1\): DataError: .*", str(failure.value))
    assert str(folder) in str(failure.value)


@pytest.mark.parametrize(("space", "args", "message"), BAD_INPUT.values(), ids=BAD_INPUT)
def test_bad_input_is_refused_in_one_line_before_any_trial(
    image_folder, tmp_path, space, args, message
):
    if space is not None:
        (tmp_path / "space.yaml").write_text(space)
        args = [*args, "--space", str(tmp_path / "space.yaml")]
    result = CliRunner().invoke(cli, ["sweep", "--data", str(image_folder), *TINY, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_a_storage_that_cannot_be_used_is_one_line_without_its_password(image_folder):
    storage = "postgresql://sweeper:s3cret@127.0.0.1:1/optuna"  # nothing listens on port 1
    result = CliRunner().invoke(
        cli, ["sweep", "--storage", storage, "--data", str(image_folder), *TINY]
    )
    assert result.exit_code == 1
    assert "cannot use the Optuna storage postgresql://sweeper:***@127.0.0.1:1/optuna" in (
        result.output
    )
    assert "s3cret" not in result.output and "Traceback" not in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_continuing_a_study_with_other_settings_is_refused(image_folder):
    assert run_sweep("--trials", "1", "--data", str(image_folder), *TINY).exit_code == 0
    result = CliRunner().invoke(
        cli, ["sweep", "--trials", "2", "--data", str(image_folder), *TINY, "--epochs", "3"]
    )
    assert result.exit_code == 1
    assert "study cifar10-tutorial was made with other settings (options.epochs)" in result.output


def test_warmup_protects_the_first_epochs():
    assert [sweep_study.warmup_epochs(n) for n in (1, 3, 5, 10, 11)] == [1, 1, 1, 2, 3]
    assert optimization.lr_factor("onecycle", 20, 100) == 1.0  # the warm-up's last step: the peak


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_the_same_command_continues_it(tmp_path, tracking_store):
    folder = write_image_folder(tmp_path / "images", {"train": 40})
    command = sweep_command(
        folder, "--trials", "3", "--epochs", "4", "--pruner", "none", "--confirm-top", "0"
    )
    env = local_env(MLFLOW_TRACKING_URI=tracking_store)
    log = tmp_path / "first.log"
    with log.open("w") as output:
        first = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:  # stop it once its first trial is done and the second one is training
            time.sleep(0.5)
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
            trials = [r for r in runs if parent_run.PARENT_TAG in r.data.tags]
            if sorted(r.info.status for r in trials) == ["FINISHED", "RUNNING"]:
                break
        os.kill(first.pid, signal.SIGINT)
        assert first.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "Continue it to 3 trials with the same command" in log.read_text()
    parent = only_parent()
    assert parent.info.status == "KILLED"
    (interrupted,) = [r for r in children(parent.info.run_id) if r.info.status == "KILLED"]
    assert interrupted.data.tags[parent_run.STATE_TAG] == "interrupted"

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert only_parent().info.run_id == parent.info.run_id
    assert only_parent().info.status == "FINISHED"
    finished = [r for r in children(parent.info.run_id) if r.info.status == "FINISHED"]
    numbers = [r.data.tags[parent_run.TRIAL_TAG] for r in finished]
    assert len(numbers) == 3 and "0" in numbers, "trial 0 was kept, not run again"


@pytest.fixture(scope="module")
def project_sweep(image_folder, empty_store, tmp_path_factory):
    """`mlflow run -e sweep` with two workers and a confirmation, once for the tests below:
    its store, and what the command printed."""
    root = tmp_path_factory.mktemp("project-sweep")
    store = copy_of_store(empty_store, root)
    command = mlflow_run_command("-e", "sweep", "--experiment-name", "sweeps", trials=4,
                                 workers=2, epochs=2, confirm_seeds=1, batch_size=8,
                                 data=image_folder)  # fmt: skip
    done = subprocess.run(command, env=local_env(MLFLOW_TRACKING_URI=store), cwd=root,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return store, done


@pytest.fixture
def in_project_sweep(project_sweep, monkeypatch):
    """MLflow's fluent API pointed at the store of `project_sweep`, for one test."""
    store, done = project_sweep
    point_mlflow_at(store, monkeypatch)
    return done


@pytest.mark.slow
def test_mlflow_run_sweep_nests_trials_under_the_run_it_made(in_project_sweep):
    parent = only_parent()
    assert mlflow.get_experiment(parent.info.experiment_id).name == "sweeps"
    assert parent.info.run_name == "sweeps-tutorial", "named after its study, not at random"
    trials = children(parent.info.run_id)
    assert len(trials) == 4
    assert {run.info.experiment_id for run in trials} == {parent.info.experiment_id}
    assert parent.data.params["batch_size"] == "8"


@pytest.mark.slow
def test_two_workers_share_one_study_and_the_cores(in_project_sweep):
    trials = children(only_parent().info.run_id)
    assert sorted(run.data.tags[parent_run.TRIAL_TAG] for run in trials) == ["0", "1", "2", "3"]
    processes = {run.data.tags["process"] for run in trials}
    assert len(processes) == 2, "two worker processes shared the trials"
    assert "[worker 0]" in in_project_sweep.stderr and "[worker 1]" in in_project_sweep.stderr
    confirming = [
        r for r in all_children(only_parent().info.run_id) if confirm.CONFIRM_TAG in r.data.tags
    ]
    assert len(confirming) == 2 and len({r.data.tags["process"] for r in confirming}) == 2
    (version,) = mlflow.MlflowClient().search_model_versions("name = 'cifar10-classifier'")
    assert version.run_id == only_parent().data.tags["sweep.winner_run_id"]
