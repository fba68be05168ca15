"""One training run, end to end: data and model in, a tracked run and its model out."""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, replace

import mlflow
import torch

from . import data, engine, models, registry, tracking
from .config import TrainConfig
from .evaluation import Evaluation, curves_figure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """Everything checked and loaded before a run starts, so bad input never makes a run."""

    config: TrainConfig
    dataset: data.Dataset
    train: data.ImageSet
    val: data.ImageSet
    runtime: engine.Runtime


@dataclass(frozen=True)
class Summary:
    run_id: str | None
    best_epoch: int
    val_accuracy: float
    test_accuracy: float | None
    registration: registry.Registration | None = None


def prepare(config: TrainConfig) -> Prepared:
    """Load and split the data and find the device; raises DataError or DeviceUnavailable."""
    runtime = engine.Runtime.resolve(config.device, config.precision)
    dataset = data.load_dataset(config.data)
    train, val = data.stratified_split(dataset.train, config.val_fraction, config.seed)
    return Prepared(config, dataset, train, val, runtime)


def run(prepared: Prepared, tracker: tracking.Tracker) -> Summary:
    config, dataset = prepared.config, prepared.dataset
    torch.manual_seed(config.seed)
    net = models.build_model(config.model, num_classes=len(dataset.classes))
    tracker.log_params(
        {
            **config.as_params(),
            "device": str(prepared.runtime.device),
            "compute_precision": prepared.runtime.precision,
            "parameter_count": models.parameter_count(net),
            "train_size": len(prepared.train),
            "val_size": len(prepared.val),
            "test_size": len(dataset.test) if dataset.test is not None else 0,
            "num_classes": len(dataset.classes),
            "torch_version": torch.__version__,
            "mlflow_version": mlflow.__version__,
            "python_version": platform.python_version(),
        }
    )
    tracker.log_dataset(dataset)
    fit = engine.fit(
        config, net, prepared.train, prepared.val, dataset.classes, tracker, prepared.runtime
    )
    tracker.log_metrics({tracking.BEST_VAL_METRIC: fit.best_val.accuracy}, step=fit.best_epoch)
    tracker.log_evaluation("val", fit.best_val)
    tracker.log_figure(curves_figure(fit.history), "training_curves.png")
    test = None
    if dataset.test is not None:
        test = engine.evaluate(
            net, dataset.test, dataset.classes, fit.normalization, prepared.runtime
        )
        tracker.log_metrics(
            {f"test/{k}": v for k, v in test.metrics().items()}, step=fit.best_epoch
        )
        tracker.log_evaluation("test", test)
    tracker.log_model(
        net,
        config.model,
        dataset.classes,
        fit.normalization,
        example_png=data.encode_png(prepared.val.images[0]),
    )
    tracker.set_description(_description(prepared, fit, test))
    return Summary(
        run_id=tracker.run_id,
        best_epoch=fit.best_epoch,
        val_accuracy=fit.best_val.accuracy,
        test_accuracy=test.accuracy if test is not None else None,
    )


def train(prepared: Prepared) -> Summary:
    """Run inside an MLflow run that ends FINISHED, FAILED or KILLED; then register it."""
    with tracking.mlflow_run(prepared.config) as tracker:
        summary = run(prepared, tracker)
    if not prepared.config.register or summary.run_id is None:
        return summary
    return replace(
        summary, registration=registry.register_run(summary.run_id, prepared.config.model_name)
    )


def _description(prepared: Prepared, fit: engine.FitResult, test: Evaluation | None) -> str:
    config, dataset = prepared.config, prepared.dataset
    test_line = (
        f"- **Test accuracy**: {test.accuracy:.2%} on {len(test.labels)} held-out images"
        if test is not None
        else "- **Test accuracy**: no test split in this data"
    )
    return "\n".join(
        [
            f"### CIFAR-10 classifier: `{config.model}`",
            "",
            f"- **Data**: `{dataset.source}` ({len(prepared.train)} train / "
            f"{len(prepared.val)} validation images, digest `{dataset.digest}`)",
            f"- **Training**: {config.epochs} epochs, batch {config.batch_size}, SGD lr "
            f"{config.lr} ({config.schedule}), momentum {config.momentum}"
            f"{' (Nesterov)' if config.nesterov else ''}, weight decay {config.weight_decay}, "
            f"label smoothing {config.label_smoothing}, lookahead "
            f"{'on' if config.lookahead else 'off'}, augmentation "
            f"{'on' if config.augment else 'off'}, on {prepared.runtime.device} "
            f"({prepared.runtime.precision})",
            f"- **Best epoch**: {fit.best_epoch}, validation accuracy {fit.best_val.accuracy:.2%}",
            test_line,
            "",
            "Load it with `mlflow.pyfunc.load_model('runs:/<run_id>/model')`; it takes a "
            "DataFrame column `image` of PNG or JPEG bytes.",
        ]
    )
