"""What plugs into the training loop's moments (`engine.Callback`).

`Tracker` is the callback that records a run (this one records nothing;
tracking.MlflowTracker records into MLflow); `ProgressBar` shows training going;
`Checkpointing` saves it and stops it cleanly when asked; `StopOnDivergence` fails
it once its loss is no longer a number. None of them imports MLflow.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from .engine import Callback, TrainingState
from .interrupts import Interrupted

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from .checkpoint import CheckpointFile
    from .data import Dataset, ImageSet
    from .evaluation import Evaluation
    from .interrupts import StopRequests
    from .predictions import Predictions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochModel:
    """An epoch's weights as a servable model (`settings`: what serving needs besides them),
    with what it answered for each validation image (single view) and its accuracy."""

    weights: dict[str, torch.Tensor]
    settings: dict[str, Any]
    predictions: Predictions
    val_accuracy: float


class Tracker(Callback):
    """Records a run: the loop's curves through the moments above, and the rest through the
    methods below, which this base leaves unrecorded (for tests, benchmarks and dry runs)."""

    run_id: str | None = None

    def on_step_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        if metrics:
            self.log_metrics(metrics, step=state.global_step)

    def on_epoch_end(self, state: TrainingState, epoch: int, metrics: dict[str, float]) -> None:
        self.log_metrics(metrics, step=epoch)

    def on_train_end(self, state: TrainingState) -> None:
        self.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        """Make every metric logged so far durable."""

    def log_dataset(self, dataset: Dataset) -> None:
        pass

    def log_confusion(self, val: Evaluation, epoch: int) -> None:
        """The validation confusion matrix after `epoch` (0: before training)."""

    def log_evaluation(self, split: str, evaluation: Evaluation, images: ImageSet) -> None:
        """How the model did on `split`, whose images are `images`."""

    def log_predictions(self, split: str, predictions: Predictions) -> None:
        """What the model answered for each image of `split`, to compare runs image by image."""

    def log_figure(self, figure: Figure, path: str) -> None:
        from matplotlib import pyplot as plt

        plt.close(figure)

    def log_model(
        self, weights: dict[str, torch.Tensor], settings: dict[str, Any], example_png: bytes
    ) -> None:
        """The network's weights as a servable model (and as the tutorial's `cifar_net.pth`);
        `settings` is what serving needs besides them."""

    def log_epoch_model(self, epoch: int, model: EpochModel, keep: int, kept_epoch: int) -> None:
        """Epoch `epoch`'s model, before its metrics are logged (they are linked to it); of the
        epochs' models only the `keep` best on validation, and `kept_epoch`'s, are kept."""

    def set_description(self, markdown: str) -> None:
        pass


class ProgressBar(Callback):
    """A bar per epoch (on a terminal) and a line of figures after each. As a context, it
    closes the bar of an epoch that does not end (an interruption, an error)."""

    def __init__(self, bars: bool = True) -> None:
        # Without bars (several processes sharing a terminal), only the line after each epoch.
        self.bar: tqdm | None = None
        self.bars = bars

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exception: object) -> None:
        self._close()

    def on_train_start(self, state: TrainingState) -> None:
        if state.global_step:
            log.info("Resuming at epoch %d, step %d", state.epoch, state.global_step)

    def on_step_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=state.steps_per_epoch, initial=state.step_in_epoch - 1, unit="step",
                desc=f"epoch {state.epoch}/{state.config.epochs}", leave=False,
                disable=None if self.bars else True,
            )  # fmt: skip
        self.bar.update()
        if metrics:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")

    def on_epoch_end(self, state: TrainingState, epoch: int, metrics: dict[str, float]) -> None:
        self._close()
        log.info(
            "epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  lr %.4g"
            "  %.1f s  (%.0f img/s)",
            epoch, state.config.epochs, metrics["train/epoch_loss"],
            100 * metrics["train/accuracy"], metrics["val/loss"], 100 * metrics["val/accuracy"],
            metrics["train/lr"], metrics["train/epoch_seconds"],
            metrics["train/images_per_second"],
        )  # fmt: skip

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainingDiverged(ArithmeticError):
    """The training loss is no longer a finite number."""


class StopOnDivergence(Callback):
    """Fails training once an epoch's training loss is NaN or infinite: the epochs left could
    not recover, and the run's record should say why it failed."""

    def on_epoch_end(self, state: TrainingState, epoch: int, metrics: dict[str, float]) -> None:
        loss = metrics["train/epoch_loss"]
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training diverged: the training loss was {loss} in epoch {epoch} "
                "(a lower --lr may help)"
            )


class Checkpointing(Callback):
    """Saves the whole training state after every epoch and, when `stop` has a signal
    pending (Ctrl-C, SIGTERM), between two steps; then raises Interrupted.

    Before each save the tracker flushes, so that the curves on record always reach as far as
    the checkpoint: a run resumed from it after a kill -9 then has no gap.

    Under torchrun every rank stops at the same step, and rank 0 alone has a `file` to save to.
    """

    def __init__(
        self, file: CheckpointFile | None, tracker: Tracker, stop: StopRequests | None = None
    ) -> None:
        self.file, self.tracker, self.stop = file, tracker, stop

    def on_step_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        # At an epoch's last step the stop waits for its validation and checkpoint.
        if state.step_in_epoch < state.steps_per_epoch:
            self._stop_if_asked(state)

    def on_epoch_end(self, state: TrainingState, epoch: int, metrics: dict[str, float]) -> None:
        self._save(state)
        self._stop_if_asked(state, saved=True)

    def _stop_if_asked(self, state: TrainingState, saved: bool = False) -> None:
        pending = self.stop.agreed() if self.stop is not None else None
        if pending is None:
            return
        if not saved:
            # Mid-epoch, the epoch's sums so far are every rank's.
            state.sums.summed_over(state.world)
            self._save(state)
        raise Interrupted(pending, checkpointed=True)

    def _save(self, state: TrainingState) -> None:
        if self.file is None:
            return
        self.tracker.flush()
        self.file.save(state.state_dict())
