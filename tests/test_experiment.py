"""One training run end to end, without the command line: what `run` records and returns,
and what resuming checks."""

import os
import socket

import mlflow
import pytest
from helpers import RecordingTracker

from cifar_experiments import experiment
from cifar_experiments.config import TrainConfig


def test_a_run_records_through_its_tracker_only(image_folder):
    """With a tracker of its own (the no-op one, in benchmarks), nothing reaches MLflow."""

    class Recording(RecordingTracker):
        def log_params(self, params):
            self.params = params

        def log_model(self, weights, settings, example_png):
            self.settings = settings

    config = TrainConfig(epochs=2, batch_size=8, data=str(image_folder))
    tracker = Recording()
    summary = experiment.run(experiment.prepare(config), tracker)
    assert mlflow.search_runs(search_all_experiments=True).empty
    assert summary.run_id is None and summary.kept_epoch in (1, 2)
    assert tracker.points["val/best_accuracy"] == [(summary.kept_epoch, summary.val_accuracy)]
    assert [s for s, _ in tracker.points["test_accuracy"]] == [summary.kept_epoch]
    assert tracker.params["compute_device"] == "cpu" and tracker.params["train_size"] == 27
    assert tracker.params["speedups"] == "channels_last,pairwise_max_pool,reuse_freed_memory"
    assert tracker.settings["classes"] == ["cat", "dog", "frog"]
    assert len(tracker.settings["mean"]) == 3


def test_whether_the_process_of_a_run_is_still_alive():
    here = socket.gethostname()
    assert experiment._alive(f"{here}:{os.getpid()}")
    assert not experiment._alive(f"{here}:999999999")
    assert not experiment._alive(None) and not experiment._alive(f"{here}:not-a-pid")
    assert experiment._alive("another-host:1")  # cannot be checked from here: assumed alive


def test_a_finished_run_has_nothing_to_resume(finished_run, in_finished_store):
    _, _, run_id = finished_run
    assert experiment.plan_resume(run_id, {}) is None
    with pytest.raises(experiment.ResumeError, match="no run"):
        experiment.plan_resume("0" * 32, {})
