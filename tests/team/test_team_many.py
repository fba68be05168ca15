"""Many at once against one team server: a sweep shared by two machines through Optuna's
storage in PostgreSQL, and eight members' trainings racing for `champion`."""

from __future__ import annotations

import subprocess
import time

import mlflow
import optuna
import pytest
from helpers import assert_every_point_once, point_mlflow_at
from team_services import DB_PASSWORD, LIMIT, logged_in, start

from cifar_experiments import gate
from cifar_experiments.sweep import confirm, parent_run
from cifar_experiments.sweep import study as sweep_study
from cifar_experiments.tracking.past_runs import saved_predictions

pytestmark = [pytest.mark.slow, pytest.mark.team]

TRAININGS = 8


def finished(processes: list[subprocess.Popen]) -> list[str]:
    """Each process's output, once all have ended; fails on any that did not end well."""
    outputs = [process.communicate(timeout=LIMIT)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    return outputs


def test_two_machines_sweep_one_study_with_no_trial_run_twice(
    tracking_server, postgres, users, image_folder, tmp_path_factory
):
    """Two working directories stand for two machines, started together on the same study:
    its trials in PostgreSQL, its runs on the tracking server."""
    env = tracking_server.user_env("alice", users["alice"], OMP_NUM_THREADS="1")
    storage = postgres.url("optuna")
    args = ["sweep", "--data", str(image_folder), "--trials", "6", "--epochs", "2",
            "--batch-size", "8", "--storage", storage, "--study", "team-study",
            "--experiment-name", "team-sweep", "--confirm-top", "2",
            "--confirm-seeds", "1"]  # fmt: skip
    machines = [tmp_path_factory.mktemp(f"sweeper-{name}") for name in "ab"]
    outputs = finished([start(env, machine, *args) for machine in machines])
    assert not [output for output in outputs if DB_PASSWORD in output], "storage shown masked"

    studies = sorted(study.study_name for study in optuna.get_all_study_summaries(storage))
    assert studies == ["team-study", "team-study:confirm"], "the search, and its confirmation"
    trials = optuna.load_study(study_name="team-study", storage=storage).get_trials()
    with logged_in("alice", users["alice"]):
        client = mlflow.MlflowClient(tracking_server.url)
        experiment = client.get_experiment_by_name("team-sweep")
        runs = client.search_runs([experiment.experiment_id])
        registered = client.search_model_versions("name = 'cifar10-classifier'")
    parents = [run for run in runs if parent_run.PARENT_TAG not in run.data.tags]
    children = [run for run in runs if parent_run.TRIAL_TAG in run.data.tags]
    confirming = [run for run in runs if confirm.CONFIRM_TAG in run.data.tags]
    assert len(parents) == 1, "one parent run for the study"
    assert {run.data.tags[parent_run.PARENT_TAG] for run in children + confirming} == {
        parents[0].info.run_id
    }
    numbers = sorted(int(run.data.tags[parent_run.TRIAL_TAG]) for run in children)
    assert numbers == list(range(6)), "each trial once, as one run"
    ran = [trial for trial in trials if not trial.user_attrs.get(sweep_study.SURPLUS_ATTR)]
    assert sorted(trial.number for trial in ran) == numbers
    assert len({run.data.tags["process"] for run in children}) == 2, "both machines took trials"

    # The two best trials confirmed once each, by whichever machine took the job first.
    assert len(runs) == 1 + 6 + 2
    assert sorted(run.data.tags[confirm.CONFIRM_TAG] for run in confirming) == sorted(
        run.data.tags[parent_run.TRIAL_TAG] for run in top_two(children)
    )
    assert {run.info.status for run in confirming} == {"FINISHED"}
    tags = parents[0].data.tags
    verdict_lines = [line for output in outputs for line in output.splitlines()
                     if line.startswith("Confirmed: ")]  # fmt: skip
    assert len(verdict_lines) == 2 and len(set(verdict_lines)) == 1, "both machines agree"
    assert f"Its best run: {tags['sweep.winner_run_id']}." in verdict_lines[0]
    winner = tags["sweep.winner_run_id"]
    assert [version.run_id for version in registered].count(winner) == 1, "registered once"


def top_two(trials: list[mlflow.entities.Run]) -> list[mlflow.entities.Run]:
    """The two best trials by validation accuracy, the lower trial number first among equals."""
    return sorted(
        trials,
        key=lambda run: (-run.data.metrics["val/best_accuracy"],
                         int(run.data.tags[parent_run.TRIAL_TAG])),
    )[:2]  # fmt: skip


def test_eight_trainings_at_once_finish_whole_and_champion_ends_on_one_none_beats(
    tracking_server, users, image_folder, tmp_path, monkeypatch
):
    # One thread each: eight processes share this machine's cores.
    env = tracking_server.user_env("bob", users["bob"], OMP_NUM_THREADS="1")
    # Into an experiment that exists, as a team's load goes. Eight processes that create one
    # together were now and then refused in it (403 on runs/create), even after waiting 10 s
    # for MLflow to grant its creator MANAGE (tracking.store.once_granted); not yet explained.
    with logged_in("bob", users["bob"]):
        mlflow.MlflowClient(tracking_server.url).create_experiment("bobs-load")
    started = time.monotonic()
    trainings = [
        start(env, tmp_path, "train", "--data", str(image_folder), "--experiment-name",
              "bobs-load", "--model-name", "bobs-classifier", "--epochs", "3", "--batch-size",
              "4", "--log-every", "1", "--val-fraction", "0.5", "--lr", str(0.002 * 2**n),
              "--run-name", f"load-{n}")
        for n in range(TRAININGS)
    ]  # fmt: skip
    finished(trainings)
    wall = time.monotonic() - started
    print(f"{TRAININGS} trainings at once against the server: {wall:.0f} s wall")

    point_mlflow_at(tracking_server.url, monkeypatch)  # where the predictions are
    with logged_in("bob", users["bob"]):
        client = mlflow.MlflowClient(tracking_server.url)
        experiment = client.get_experiment_by_name("bobs-load")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == TRAININGS and {run.info.status for run in runs} == {"FINISHED"}
        for run in runs:
            assert_every_point_once(client, run.info.run_id, epochs=3)
        champion = client.get_model_version_by_alias("bobs-classifier", "champion")
        versions = client.search_model_versions("name = 'bobs-classifier'")
        assert len(versions) == TRAININGS

        def candidate(version) -> gate.Candidate:
            saved = saved_predictions(version.run_id, "val")
            return gate.Candidate(str(version.version), float(version.tags["val_accuracy"]), saved)

        # The race ends on a champion that no version of it beats by the gate's own test.
        held = candidate(champion)
        preferred = [
            str(version.version)
            for version in versions
            if gate.decide("significant", 0.05, candidate(version), held).promotes
        ]
    assert preferred == []
