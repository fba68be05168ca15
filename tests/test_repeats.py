"""`train --repeats N`: N seeds of one setting as child runs of one parent, summed up over
seeds on the parent, and the best child registered through the gate."""

from __future__ import annotations

import statistics
import subprocess

import mlflow
import pytest
from click.testing import CliRunner
from helpers import TINY, cli_command, local_env

from cifar_experiments.cli import cli
from cifar_experiments.repeats import SEED_TAG
from cifar_experiments.tracking.keys import PARENT_TAG


def parent_and_children() -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (parent,) = [run for run in runs if PARENT_TAG not in run.data.tags]
    children = [run for run in runs if run.data.tags.get(PARENT_TAG) == parent.info.run_id]
    return parent, sorted(children, key=lambda run: int(run.data.tags[SEED_TAG]))


def test_three_seeds_are_children_of_one_parent_that_sums_them_up(image_folder):
    result = CliRunner().invoke(cli, ["train", *TINY, "--epochs", "1", "--repeats", "3",
                                      "--seed", "5", "--data", str(image_folder)])  # fmt: skip
    assert result.exit_code == 0, result.output
    parent, children = parent_and_children()
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tutorial-1-epochs-3-seeds"
    assert [run.data.tags[SEED_TAG] for run in children] == ["5", "6", "7"]
    assert all(run.info.status == "FINISHED" for run in children)
    assert {run.data.params["seed"] for run in children} == {"5", "6", "7"}
    assert len({run.data.params["split_seed"] for run in children}) == 1, "one validation split"

    vals = [run.data.metrics["val/best_accuracy"] for run in children]
    metrics = parent.data.metrics
    assert metrics["repeats/val_accuracy_mean"] == pytest.approx(statistics.fmean(vals))
    assert metrics["repeats/val_accuracy_std"] == pytest.approx(statistics.stdev(vals))
    low, high = metrics["repeats/val_accuracy_ci_low"], metrics["repeats/val_accuracy_ci_high"]
    assert low <= metrics["repeats/val_accuracy_mean"] <= high
    tests = [run.data.metrics["test_accuracy"] for run in children]
    assert metrics["repeats/test_accuracy_mean"] == pytest.approx(statistics.fmean(tests))
    artifacts = [
        f.path for f in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "repeats")
    ]
    assert artifacts == ["repeats/val_curves.png"]

    # The best child, and only it, went through the gate.
    (version,) = mlflow.MlflowClient().search_model_versions("name = 'cifar10-classifier'")
    best = max(
        children,
        key=lambda run: (run.data.metrics["val/best_accuracy"], -int(run.data.tags[SEED_TAG])),
    )
    assert version.run_id == best.info.run_id and version.tags["gate.verdict"] == "first"
    assert f"Repeats tutorial-1-epochs-3-seeds (parent run {parent.info.run_id})" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeats", "0"], "Invalid value for '--repeats': must be at least 1"),
        (["--repeats", "2", "--resume", "0" * 32], "repeats are not resumed"),
    ],
)
def test_bad_repeats_are_one_line_before_any_run(image_folder, args, message):
    result = CliRunner().invoke(cli, ["train", *TINY, "--data", str(image_folder), *args])
    assert result.exit_code == 2 and message in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty


@pytest.mark.slow
def test_two_workers_share_the_repeats(image_folder, tracking_store, tmp_path):
    done = subprocess.run(
        cli_command("train", *TINY, "--repeats", "2", "--workers", "2", "--no-register",
                    "--data", str(image_folder)),
        env=local_env(MLFLOW_TRACKING_URI=tracking_store), cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = parent_and_children()
    assert len(children) == 2 and parent.info.status == "FINISHED"
    assert len({run.data.tags["process"] for run in children}) == 2, "one process per worker"
    assert "[worker 0]" in done.stderr and "[worker 1]" in done.stderr
