"""What plugs into the training loop: the tracker's moments, the progress bar, checkpoints and
a clean stop."""

import logging
import signal
import subprocess
import sys

import pytest
from helpers import RecordingTracker, tiny_set

from cifar_experiments import checkpoint, engine
from cifar_experiments.callbacks import Checkpointing, ProgressBar, Tracker
from cifar_experiments.config import TrainConfig
from cifar_experiments.interrupts import Interrupted, StopRequests


@pytest.fixture
def state() -> engine.TrainingState:
    """A fresh tutorial training on 27 images: 3 steps an epoch."""
    config = TrainConfig(epochs=2, batch_size=8, log_every=1)
    return engine.TrainingState.create(
        config, tiny_set(9, 0), ("r", "g", "b"), engine.Runtime.resolve("cpu")
    )


class CountingTracker(RecordingTracker):
    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1


def test_the_tracker_logs_the_loss_curve_by_step_and_the_epoch_by_epoch(state):
    tracker = CountingTracker()
    state.global_step = 7
    tracker.on_step_end(state, {})
    tracker.on_step_end(state, {"train/loss": 1.5})
    tracker.on_epoch_end(state, 2, {"val/accuracy": 0.5})
    assert tracker.points == {"train/loss": [(7, 1.5)], "val/accuracy": [(2, 0.5)]}
    assert tracker.flushes == 0
    tracker.on_train_end(state)
    assert tracker.flushes == 1


def test_the_no_op_tracker_and_the_callbacks_need_no_mlflow():
    script = (
        "import sys\n"
        "from cifar_experiments import callbacks, engine\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'mlflow'], 'mlflow imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    Tracker().log_params({"a": 1})  # records nothing, and does not fail


def test_checkpoints_are_saved_after_every_epoch_after_a_flush(state, tmp_path):
    tracker = CountingTracker()
    file = checkpoint.CheckpointFile(tmp_path / "run.pt", meta={"run": "x"})
    saves = []
    real_save = file.save
    object.__setattr__(
        file, "save", lambda training: saves.append(tracker.flushes) or real_save(training)
    )
    engine.fit(state, tiny_set(2, 5), [tracker, Checkpointing(file, tracker)])
    assert saves == [1, 2]  # one per epoch, each after the tracker flushed
    saved = checkpoint.load(file.path)
    assert saved["training"]["progress"]["epoch"] == 3 and saved["meta"] == {"run": "x"}


def test_a_stop_request_mid_epoch_saves_and_stops_after_that_step(state, tmp_path):
    tracker, stop = RecordingTracker(), StopRequests()
    file = checkpoint.CheckpointFile(tmp_path / "run.pt")
    callback = Checkpointing(file, tracker, stop)
    state.step_in_epoch = 1
    callback.on_step_end(state, {})
    assert not file.path.exists()  # nothing asked yet
    stop.pending = signal.SIGTERM
    with pytest.raises(Interrupted) as raised:
        callback.on_step_end(state, {})
    assert raised.value.checkpointed and raised.value.exit_code == 143
    assert checkpoint.load(file.path)["training"]["progress"]["step_in_epoch"] == 1


def test_at_an_epochs_last_step_the_stop_waits_for_the_epochs_checkpoint(state, tmp_path):
    tracker, stop = RecordingTracker(), StopRequests()
    file = checkpoint.CheckpointFile(tmp_path / "run.pt")
    callback = Checkpointing(file, tracker, stop)
    stop.pending = signal.SIGINT
    state.step_in_epoch = state.steps_per_epoch
    callback.on_step_end(state, {"train/loss": 1.0})  # no stop yet: validation comes first
    assert not file.path.exists()
    with pytest.raises(Interrupted):
        callback.on_epoch_end(state, 1, {})
    assert file.path.exists()


def test_the_progress_bar_says_each_epoch_and_a_resumption(state, caplog):
    caplog.set_level(logging.INFO, logger="cifar_experiments")
    engine.fit(state, tiny_set(2, 5), [ProgressBar()])
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert "val acc" not in lines[0] and "val loss" in lines[0] and "img/s" in lines[0]
    caplog.clear()
    state.global_step, state.epoch = 3, 2
    ProgressBar().on_train_start(state)
    assert caplog.records[0].getMessage() == "Resuming at epoch 2, step 3"


def test_the_bar_of_an_epoch_that_does_not_end_is_closed(state):
    with pytest.raises(Interrupted), ProgressBar() as progress:
        state.step_in_epoch = 1
        progress.on_step_end(state, {})
        assert progress.bar is not None
        raise Interrupted(signal.SIGINT)
    assert progress.bar is None
