"""What logging each epoch's model costs a tutorial training, on real data.

    python benchmarks/epoch_models.py /tmp/cifar10-holdout [--models 8]

In a fresh SQLite store and one run: the second of two epochs of the tutorial Net through
`engine.fit` (the reference), then `--models` epoch models logged as training logs them
(experiment.EpochModels, with the default --keep-models, so the later ones also delete the
worst), then the run's own model. Prints each one's seconds and the share of the epoch it
adds. The first epoch model pays MLflow's one-time imports, which the run's own model pays
otherwise: `--models 0` times that model alone. Not part of the test suite (real data).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlflow

from cifar_experiments import data, engine, experiment
from cifar_experiments.config import TrainConfig, field_default
from cifar_experiments.tracking.recorder import MlflowTracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--models", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="epoch-models-"))
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    config = TrainConfig(data=args.folder, epochs=2, checkpoint_dir=str(work / "checkpoints"))
    prepared = experiment.prepare(config)
    state = engine.TrainingState.create(
        config, prepared.train, prepared.dataset.classes, prepared.runtime
    )
    with mlflow.start_run() as run:
        fit = engine.fit(state, prepared.val)
        assert fit is not None
        epoch_seconds = fit.history[1]["train/epoch_seconds"]  # the first warms up
        tracker = MlflowTracker(run.info.run_id)
        logger = experiment.EpochModels(prepared, tracker)
        seconds = []
        for epoch in range(1, args.models + 1):
            started = time.perf_counter()
            logger.on_epoch_end(state, epoch, fit.history[0])
            seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        weights, settings = experiment._servable(prepared, state)
        tracker.log_model(weights, settings, data.encode_png(prepared.val.images[0]))
        final = time.perf_counter() - started
    print(f"one tutorial epoch: {epoch_seconds:.1f} s ({len(prepared.train)} images, "
          f"{prepared.runtime.precision}); the run's own model, logged after "
          f"{len(seconds)} epoch models: {final:.2f} s")  # fmt: skip
    if seconds:
        later = statistics.median(seconds[1:])
        print(
            f"logging an epoch's model (keep {field_default('keep_models')}): first "
            f"{seconds[0]:.2f} s ({seconds[0] / epoch_seconds:.2%} of the epoch), then median "
            f"{later:.3f} s ({later / epoch_seconds:.2%}); each: "
            + ", ".join(f"{s:.3f}" for s in seconds)
        )


if __name__ == "__main__":
    main()
