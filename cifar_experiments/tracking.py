"""Every MLflow call of a training run lives here, behind a small Tracker interface.

`Tracker` records nothing (for tests, benchmarks and dry runs); `MlflowTracker` records a run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import torch
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, RunStatus

from . import serving
from .config import TrainConfig
from .data import Dataset, Normalization
from .evaluation import Evaluation

log = logging.getLogger(__name__)

WEIGHTS_FILE = "cifar_net.pth"
# The run-level figure that model selection reads: validation accuracy of the best epoch.
BEST_VAL_METRIC = "val/best_accuracy"
MODEL_NAME = "model"
# Set by `mlflow run` for the process it starts: the run it made for us to fill in.
PROJECT_RUN_ENV = "MLFLOW_RUN_ID"
ERROR_TAG = "error"


class Tracker:
    """The tracking interface. This base records nothing."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_dataset(self, dataset: Dataset) -> None:
        pass

    def log_evaluation(self, split: str, evaluation: Evaluation) -> None:
        pass

    def log_figure(self, figure: Figure, path: str) -> None:
        plt.close(figure)

    def log_model(
        self,
        net: torch.nn.Module,
        model_name: str,
        classes: tuple[str, ...],
        normalization: Normalization,
        example_png: bytes,
    ) -> None:
        pass

    def set_description(self, markdown: str) -> None:
        pass


class MlflowTracker(Tracker):
    # Metrics are written in batches at most this often: one SQLite write costs milliseconds,
    # a training step less, and MLflow's own async queue competes with training for 2 cores.
    FLUSH_SECONDS = 5.0

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._pending: list[Metric] = []
        self._flushed_at = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        # `mlflow run` has already logged its entry-point parameters, as typed on its command
        # line ("1e-3"); logging "0.001" again would be refused as a change, so keep theirs.
        existing = mlflow.get_run(self.run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in existing})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), timestamp, step) for k, v in metrics.items()]
        if time.monotonic() - self._flushed_at >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            mlflow.MlflowClient().log_batch(self.run_id, metrics=self._pending)
        self._pending = []
        self._flushed_at = time.monotonic()

    def log_dataset(self, dataset: Dataset) -> None:
        with warnings.catch_warnings():
            # MLflow registers two equivalent sources for local paths and warns that it picked one.
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            source = resolve_dataset_source(dataset.source)
        meta = MetaDataset(source=source, name=dataset.name, digest=dataset.digest)
        mlflow.log_input(meta, context="training")

    def log_evaluation(self, split: str, evaluation: Evaluation) -> None:
        folder = f"evaluation/{split}"
        mlflow.log_dict(evaluation.confusion_json(), f"{folder}/confusion_matrix.json")
        mlflow.log_dict(evaluation.report(), f"{folder}/classification_report.json")
        mlflow.log_text(evaluation.report_text(), f"{folder}/classification_report.txt")
        self.log_figure(
            evaluation.confusion_figure(f"{split} confusion matrix"),
            f"{folder}/confusion_matrix.png",
        )

    def log_figure(self, figure: Figure, path: str) -> None:
        mlflow.log_figure(figure, path)
        plt.close(figure)

    def log_model(
        self,
        net: torch.nn.Module,
        model_name: str,
        classes: tuple[str, ...],
        normalization: Normalization,
        example_png: bytes,
    ) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / WEIGHTS_FILE
            torch.save({k: v.cpu() for k, v in net.state_dict().items()}, weights)
            mlflow.log_artifact(str(weights))
            settings = Path(tmp) / "classifier.json"
            settings.write_text(json.dumps(serving.settings(model_name, classes, normalization)))
            package = Path(__file__).parent
            mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(package / "pyfunc_entry.py"),
                artifacts={
                    serving.WEIGHTS_ARTIFACT: str(weights),
                    serving.SETTINGS_ARTIFACT: str(settings),
                },
                code_paths=[str(package)],
                signature=serving.signature(classes),
                input_example=serving.example_input(example_png),
                pip_requirements=serving.pip_requirements(),
            )

    def set_description(self, markdown: str) -> None:
        mlflow.set_tag("mlflow.note.content", markdown)


@contextmanager
def mlflow_run(config: TrainConfig) -> Iterator[MlflowTracker]:
    """Start a run (or continue the one `mlflow run` made) and always end it.

    FINISHED on success, KILLED on Ctrl-C, FAILED with the error in a tag on an exception.
    """
    if PROJECT_RUN_ENV not in os.environ:
        mlflow.set_experiment(config.experiment_name)
    run = mlflow.start_run(run_name=config.run_name, log_system_metrics=True)
    tracker = MlflowTracker(run.info.run_id)
    try:
        yield tracker
    except KeyboardInterrupt:
        _end(tracker, RunStatus.KILLED, "interrupted")
        raise
    except BaseException as error:
        _end(tracker, RunStatus.FAILED, f"{type(error).__name__}: {error}")
        raise
    else:
        _end(tracker, RunStatus.FINISHED)


def _end(tracker: MlflowTracker, status: int, error: str | None = None) -> None:
    try:
        tracker.flush()
        if error:
            mlflow.set_tag(ERROR_TAG, error[:5000])
    finally:
        mlflow.end_run(RunStatus.to_string(status))


def mark_project_run_failed(message: str) -> None:
    """Under `mlflow run`, say on its run why we refused to start (it marks it FAILED)."""
    run_id = os.environ.get(PROJECT_RUN_ENV)
    if run_id:
        mlflow.MlflowClient().set_tag(run_id, ERROR_TAG, message)


def tracking_uri() -> str:
    """The store's URI, absolute, so the UI command works from any directory."""
    uri = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri
