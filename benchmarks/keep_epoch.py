"""Should airbench keep its last epoch, or the epoch its small validation split likes best?

    python benchmarks/keep_epoch.py /path/to/image-folder [--splits 10] [--batch-sizes 512 1024]

(`--device cpu --epochs 2 --splits 1` on a small folder checks the script itself.)

For each dev split (5,000 images, or half a small pool, carved by seed 100 + i from the
training pool; the tenth that gpu.py holds out is never scored), trains airbench's recipe
through `engine.fit` and scores both candidates on the dev split with test-time
augmentation: the last epoch's weights, caught as the last epoch is reported, and the
weights `fit` ends with under `keep_epoch=best`. Prints a JSON line per run and the means.
Seconds a run on a GPU, long on a CPU. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

from gpu import held_out

from cifar_experiments import data, engine
from cifar_experiments.config import TrainConfig
from cifar_experiments.recipes import AIRBENCH94_SGD

DEV_IMAGES = 5000


class LastEpochScorer(engine.Callback):
    """Scores the network on the dev split as its last epoch ends."""

    def __init__(self, dev: data.ImageSet) -> None:
        self.dev = dev
        self.accuracy: float | None = None

    def on_epoch_end(self, state: engine.TrainingState, epoch: int, metrics: dict) -> None:
        if epoch == state.config.epochs:
            self.accuracy = state.evaluate(self.dev).accuracy


def run(config: TrainConfig, pool: data.ImageSet, dev: data.ImageSet, classes) -> dict:
    runtime = engine.Runtime.resolve(config.device, config.precision)
    train, val = data.stratified_split(pool, config.val_fraction, config.seed)
    state = engine.TrainingState.create(config, train, classes, runtime)
    last = LastEpochScorer(dev)
    result = engine.fit(state, val, [last])
    return {
        "batch_size": config.batch_size,
        "seed": config.seed,
        "best_epoch": result.kept_epoch,
        "dev_best": state.evaluate(dev).accuracy,
        "dev_last": last.accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    dataset = data.load_dataset(args.folder)
    pool, _ = held_out(dataset)
    recipe = TrainConfig(
        model="airbench", epochs=args.epochs, device=args.device, keep_epoch="best"
    )
    results = []
    for split in range(args.splits):
        train_pool, dev = data.stratified_split(pool, min(0.5, DEV_IMAGES / len(pool)), 100 + split)
        for batch_size in args.batch_sizes:
            sgd = AIRBENCH94_SGD.in_pytorch_terms(batch_size)
            config = replace(recipe, **sgd, seed=split)
            results.append(run(config, train_pool, dev, dataset.classes))
            print(json.dumps(results[-1]), flush=True)
    for batch_size in args.batch_sizes:
        rows = [r for r in results if r["batch_size"] == batch_size]
        earlier = sum(r["best_epoch"] < recipe.epochs for r in rows)
        print(
            f"batch {batch_size}: best epoch {statistics.mean(r['dev_best'] for r in rows):.2%}, "
            f"last epoch {statistics.mean(r['dev_last'] for r in rows):.2%}; validation picked "
            f"an earlier epoch in {earlier} of {len(rows)}"
        )


if __name__ == "__main__":
    main()
