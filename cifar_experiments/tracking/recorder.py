"""`MlflowTracker` records a training run into MLflow behind the `callbacks.Tracker`
interface: params, batched metrics, the data set, pictures, evaluations and the model."""

from __future__ import annotations

import functools
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import torch
from matplotlib import pyplot as plt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.models.model import ModelInfo
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from .. import serving
from ..callbacks import Tracker
from ..predictions import FILE as PREDICTIONS_FILE
from ..predictions import Predictions
from .keys import CHECKPOINT_TAG, EPOCH_TAG, MODEL_NAME
from .past_runs import epoch_models
from .store import with_retries

if TYPE_CHECKING:
    from ..callbacks import EpochModel
    from ..data import Dataset, ImageSet
    from ..engine import TrainingState
    from ..evaluation import Evaluation

WEIGHTS_FILE = "cifar_net.pth"
# The validation confusion matrix of each epoch, as an image with a step.
EPOCH_CONFUSION_KEY = "val_confusion_matrix"


class MlflowTracker(Tracker):
    # Metrics are written in batches at most this often: one SQLite write costs milliseconds,
    # a training step less, and MLflow's own async queue competes with training for 2 cores.
    FLUSH_SECONDS = 5.0
    run_id: str  # always a run: the base's None stands for "untracked"

    def __init__(self, run_id: str, resumed: bool = False, child: bool = False) -> None:
        self.run_id = run_id
        # A child run (a sweep's trial, a repeat) is one of many: its weights are stored once,
        # in its model, not again as the tutorial's cifar_net.pth.
        self.tutorial_copy = not child
        self.checkpoint: Path | None = None
        self._pending: list[Metric] = []
        self._flushed_at = time.monotonic()
        # A resumed run may replay steps it logged before it stopped; each step is kept once.
        self._logged_through = _last_steps(run_id) if resumed else {}
        # Its epochs' models so far, by epoch: the model's id and its validation accuracy.
        self.epoch_models = epoch_models(run_id) if resumed and not child else {}

    def record_checkpoint(self, path: Path) -> None:
        self.checkpoint = path
        mlflow.set_tag(CHECKPOINT_TAG, str(path))

    def log_params(self, params: dict[str, Any]) -> None:
        # `mlflow run` has already logged its entry-point parameters, as typed on its command
        # line ("1e-3"); logging "0.001" again would be refused as a change, so keep theirs.
        existing = mlflow.get_run(self.run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in existing})

    def log_metrics(
        self, metrics: dict[str, float], step: int, model_id: str | None = None
    ) -> None:
        timestamp = int(time.time() * 1000)
        self._pending += [
            Metric(k, float(v), timestamp, step, model_id=model_id)
            for k, v in metrics.items()
            if step > self._logged_through.get(k, -1)
        ]
        if time.monotonic() - self._flushed_at >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            client = mlflow.MlflowClient()
            # MLflow takes at most 1000 metrics a call.
            for start in range(0, len(self._pending), 1000):
                batch = self._pending[start : start + 1000]
                with_retries(functools.partial(client.log_batch, self.run_id, metrics=batch))
        self._pending = []
        self._flushed_at = time.monotonic()

    def log_dataset(self, dataset: Dataset) -> None:
        with warnings.catch_warnings():
            # MLflow registers two equivalent sources for local paths and warns that it picked one.
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            source = resolve_dataset_source(dataset.source)
        # MLflow's Dataset marks `profile` abstract without being an ABC; MetaDataset, its class
        # for data known by name and digest only, has none.
        meta = MetaDataset(source=source, name=dataset.name, digest=dataset.digest)  # type: ignore[abstract]
        with_retries(lambda: mlflow.log_input(meta, context="training"))

    def on_epoch_end(self, state: TrainingState, epoch: int, metrics: dict[str, float]) -> None:
        # Linked to the epoch's model, if it has one: the run's Models tab ranks them by these.
        model = self.epoch_models.get(epoch)
        self.log_metrics(metrics, step=epoch, model_id=model[0] if model else None)
        if state.last_val is not None and epoch > self._logged_through.get("val/accuracy", -1):
            self.log_confusion(state.last_val, epoch)

    def log_confusion(self, val: Evaluation, epoch: int) -> None:
        # One image per epoch under one key: the UI's image slider shows the matrix forming.
        # Written now, not queued (MLflow's default for stepped images): a killed process loses
        # no image, and the run's end does not wait up to a second for MLflow's queue to wake.
        figure = val.shares_figure(f"validation, epoch {epoch}")
        mlflow.log_image(_pixels(figure), key=EPOCH_CONFUSION_KEY, step=epoch, synchronous=True)

    def log_evaluation(self, split: str, evaluation: Evaluation, images: ImageSet) -> None:
        folder = f"evaluation/{split}"
        mlflow.log_dict(evaluation.confusion_json(), f"{folder}/confusion_matrix.json")
        mlflow.log_dict(evaluation.report(), f"{folder}/classification_report.json")
        mlflow.log_text(evaluation.report_text(), f"{folder}/classification_report.txt")
        mlflow.log_table(evaluation.per_class_table(), f"{folder}/per_class.json")
        self.log_figure(
            evaluation.confusion_figure(f"{split} confusion matrix"),
            f"{folder}/confusion_matrix.png",
        )
        mistakes = evaluation.mistakes_figure(images.images.cpu().numpy(), f"{split} split")
        if mistakes is not None:
            self.log_figure(mistakes, f"{folder}/confident_mistakes.png")

    def log_predictions(self, split: str, predictions: Predictions) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / PREDICTIONS_FILE
            path.write_bytes(predictions.to_bytes())
            mlflow.log_artifact(str(path), f"evaluation/{split}")

    def log_figure(self, figure: Figure, path: str) -> None:
        mlflow.log_figure(figure, path)
        plt.close(figure)

    def log_model(
        self, weights: dict[str, torch.Tensor], settings: dict[str, Any], example_png: bytes
    ) -> None:
        _log_servable(MODEL_NAME, weights, settings, example_png, run_copy=self.tutorial_copy)

    def log_epoch_model(self, epoch: int, model: EpochModel, keep: int, kept_epoch: int) -> None:
        if not self.tutorial_copy or epoch in self.epoch_models:  # a child run; or replayed
            return
        # No input example: checking it loads the model back, 35 ms, 1.5 % of an epoch of the
        # tutorial Net; the run's own model, logged the same way, is checked once.
        info = _log_servable(
            f"epoch-{epoch}", model.weights, model.settings, None, step=epoch,
            tags={EPOCH_TAG: str(epoch)}, files={PREDICTIONS_FILE: model.predictions.to_bytes()},
        )  # fmt: skip
        self.epoch_models[epoch] = (info.model_id, model.val_accuracy)
        best_first = sorted(self.epoch_models, key=lambda e: self.epoch_models[e][1], reverse=True)
        for dropped in best_first[keep:]:
            if dropped != kept_epoch:
                _delete_logged_model(self.epoch_models.pop(dropped)[0])

    def set_description(self, markdown: str) -> None:
        mlflow.set_tag("mlflow.note.content", markdown)


def _log_servable(
    name: str, weights: dict[str, torch.Tensor], settings: dict[str, Any],
    example_png: bytes | None, step: int = 0, tags: dict[str, str] | None = None,
    files: dict[str, bytes] | None = None, run_copy: bool = False,
) -> ModelInfo:  # fmt: skip
    """`weights` as a pyfunc model from code (serving.py), a LoggedModel of the active run;
    `files` go into its artifacts beside them. With `example_png`, MLflow saves the input
    example and checks that the model, loaded back, answers it (a tenth of a second). With
    `run_copy`, the weights file is also an artifact of the run (the tutorial's own)."""
    with tempfile.TemporaryDirectory() as tmp:
        weights_file = Path(tmp) / WEIGHTS_FILE
        torch.save(weights, weights_file)
        if run_copy:
            mlflow.log_artifact(str(weights_file))
        settings_file = Path(tmp) / "classifier.json"
        settings_file.write_text(json.dumps(settings))
        artifacts = {
            serving.WEIGHTS_ARTIFACT: weights_file,
            serving.SETTINGS_ARTIFACT: settings_file,
        }
        for file_name, content in (files or {}).items():
            artifacts[file_name] = Path(tmp) / file_name
            artifacts[file_name].write_bytes(content)
        package = Path(__file__).parents[1]
        example = serving.example_input(example_png) if example_png is not None else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*An input example was not provided")
            return mlflow.pyfunc.log_model(
                name=name,
                step=step,
                tags=tags,
                python_model=str(package / "pyfunc_entry.py"),
                artifacts={key: str(path) for key, path in artifacts.items()},
                code_paths=[str(package)],
                signature=serving.signature(tuple(settings["classes"])),
                input_example=example,
                pip_requirements=serving.pip_requirements(),
            )


def _delete_logged_model(model_id: str) -> None:
    """Its files too: MLflow only marks a model deleted, until `mlflow gc`."""
    client = mlflow.MlflowClient()
    location = client.get_logged_model(model_id).artifact_location
    get_artifact_repository(location).delete_artifacts()
    client.delete_logged_model(model_id)


def _pixels(figure: Figure) -> np.ndarray:
    """A figure drawn as RGB pixels, and closed."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return pixels


def _last_steps(run_id: str) -> dict[str, int]:
    client = mlflow.MlflowClient()
    return {
        key: max(m.step for m in client.get_metric_history(run_id, key))
        for key in client.get_run(run_id).data.metrics
    }
