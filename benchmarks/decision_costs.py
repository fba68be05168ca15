"""What the statistical decisions cost, measured on one machine in one run.

    python benchmarks/decision_costs.py /path/to/image-folder [--epochs 10]

(1) The champion gate on 10,000 images, as registration runs it: two runs' predictions of
10,000 images each are logged to a temporary SQLite store, then read back from it and judged
(`gate.decide`); the median of 5. The same for a sweep's confirmation verdict
(`confirm.judge`, two settings of two seeds each). (2) Saving predictions: a tutorial
training on the folder, `--epochs` long, with the time spent saving its per-image predictions
(building them, writing the file, logging the artifact) summed, as a share of the whole
training's time. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import mlflow
import numpy as np

from cifar_experiments import experiment, gate
from cifar_experiments.config import TrainConfig
from cifar_experiments.predictions import Predictions
from cifar_experiments.sweep import confirm
from cifar_experiments.tracking import past_runs, recorder

IMAGES = 10_000
CLASSES = tuple(f"class{i}" for i in range(10))


def predictions_of(accuracy: float, seed: int) -> Predictions:
    """10,000 images' answers, right on about `accuracy` of them at random."""
    rng = np.random.default_rng(seed)
    labels = np.arange(IMAGES) % len(CLASSES)
    right = rng.random(IMAGES) < accuracy
    predicted = np.where(right, labels, (labels + 1) % len(CLASSES))
    p_true = np.where(right, 0.8, 0.1).astype(np.float32)
    return Predictions(CLASSES, np.arange(IMAGES), labels.astype(np.int16),
                       predicted.astype(np.int16), p_true, "data", "split")  # fmt: skip


def logged_run(predictions: Predictions) -> str:
    with mlflow.start_run() as run:
        recorder.MlflowTracker(run.info.run_id).log_predictions("val", predictions)
    return run.info.run_id


def median_seconds(work: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def gate_seconds() -> tuple[float, float]:
    candidate, champion = logged_run(predictions_of(0.71, 1)), logged_run(predictions_of(0.70, 2))

    def registration_gate() -> gate.Decision:
        new, old = (past_runs.saved_predictions(run, "val") for run in (candidate, champion))
        return gate.decide("significant", 0.05, gate.Candidate("2", 0.71, new),
                           gate.Candidate("1", 0.70, old))  # fmt: skip

    seeds = {f"{trial}-{seed}": predictions_of(0.70 + 0.01 * trial, 10 * trial + seed)
             for trial in (0, 1) for seed in (0, 1)}  # fmt: skip
    confirmed = {trial: [f"{trial}-0", f"{trial}-1"] for trial in (0, 1)}
    return (
        median_seconds(registration_gate),
        median_seconds(lambda: confirm.judge(confirmed, {}, seeds, 0.05)),
    )


def predictions_share(folder: str, epochs: int) -> tuple[float, float]:
    """Seconds a training spent saving predictions, and the training's seconds."""
    spent = [0.0]

    def timed(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        return wrapper

    Predictions.of = timed(Predictions.of)  # type: ignore[method-assign]
    recorder.MlflowTracker.log_predictions = timed(  # type: ignore[method-assign]
        recorder.MlflowTracker.log_predictions
    )
    prepared = experiment.prepare(TrainConfig(epochs=epochs, data=folder, register=False))
    started = time.perf_counter()
    experiment.train(prepared, progress_bars=False)
    return spent[0], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", help="image folder with train/ and test/")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        gate_time, verdict_time = gate_seconds()
        print(f"champion gate on {IMAGES:,} images (read back from the store and judged): "
              f"{gate_time:.3f} s, median of 5")  # fmt: skip
        print(f"sweep verdict, 2 settings x 2 seeds of {IMAGES:,} images: {verdict_time:.3f} s")
        saving, training = predictions_share(args.folder, args.epochs)
        print(f"saving predictions: {saving:.3f} s of a {training:.1f} s {args.epochs}-epoch "
              f"tutorial training, {100 * saving / training:.2f} %")  # fmt: skip


if __name__ == "__main__":
    main()
