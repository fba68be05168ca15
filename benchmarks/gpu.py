"""Training time and held-out accuracy of both models on a CUDA GPU.

    python benchmarks/gpu.py /path/to/image-folder [--seeds 2] [--compile] [--out results.json]

(`--device cpu --epochs 1` on a small folder checks the script itself on any machine.)

Trains each variant for 10 epochs through `engine.fit`, the loop `mlflow run` uses, with no
tracker (MLflow itself costs the same on any device and is measured by speed.py), and scores
the held-out images with the model's test-time augmentation, as the logged model does. A
folder without test/ gives up a tenth of every class, by a fixed seed, as held-out images.
Short runs first pay CUDA's and cuDNN's one-off start-up, so the timed runs measure training
alone. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from cifar_experiments import data, engine
from cifar_experiments.config import TrainConfig
from cifar_experiments.recipes import RECIPES

HOLD_OUT_SEED = 2026


def held_out(dataset: data.Dataset) -> tuple[data.ImageSet, data.ImageSet]:
    if dataset.test is not None:
        return dataset.train, dataset.test
    return data.stratified_split(dataset.train, 0.1, HOLD_OUT_SEED)


def synchronize(runtime: engine.Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()


def run(
    config: TrainConfig, pool: data.ImageSet, test: data.ImageSet, classes: tuple[str, ...]
) -> dict:
    runtime = engine.Runtime.resolve(config.device, config.precision)
    train, val = data.stratified_split(pool, config.val_fraction, config.seed)
    synchronize(runtime)
    started = time.perf_counter()
    state = engine.TrainingState.create(config, train, classes, runtime)
    result = engine.fit(state, val)
    synchronize(runtime)
    seconds = time.perf_counter() - started
    scored = state.evaluate(test)
    epochs = [h["train/epoch_seconds"] for h in result.history]
    return {
        "model": config.model,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "compile": config.compile,
        "seed": config.seed,
        "training_s": round(seconds, 3),
        "first_epoch_s": round(epochs[0], 3),
        "median_epoch_s": round(statistics.median(epochs), 3),
        "val_accuracy": round(result.kept_val.accuracy, 4),
        "test_accuracy": round(scored.accuracy, 4),
        "train_images": len(train),
        "test_images": len(test),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{device}, torch {torch.__version__}", flush=True)

    started = time.perf_counter()
    dataset = data.load_dataset(args.folder)
    pool, test = held_out(dataset)
    print(f"data: {len(pool)} to train on, {len(test)} held out, "
          f"{time.perf_counter() - started:.1f} s to read", flush=True)  # fmt: skip

    airbench = TrainConfig(model="airbench", epochs=args.epochs, device=args.device)
    tutorial = TrainConfig(model="tutorial", epochs=args.epochs, device=args.device)
    timed = [(f"airbench, seed {s}", replace(airbench, seed=s)) for s in range(args.seeds)]
    cpu_recipe = {k: RECIPES["airbench"][k] for k in ("batch_size", "lr")}
    timed += [
        ("airbench, the CPU recipe's batch", replace(airbench, **cpu_recipe)),
        ("tutorial", tutorial),
    ]
    if args.compile:
        timed.append(("airbench, compiled", replace(airbench, compile=True)))
    # One epoch of each distinct set-up first: CUDA's start and cuDNN's kernel search for each
    # batch shape are paid once per process, not per run.
    warm_ups: dict[tuple, TrainConfig] = {}
    for _, config in timed:
        if not config.compile:
            warm_ups.setdefault((config.model, config.batch_size), config)
    variants = [("warm-up", replace(c, epochs=1)) for c in warm_ups.values()] + timed
    results = []
    for name, config in variants:
        result = {"variant": name, **run(config, pool, test, dataset.classes)}
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": device, "torch": torch.__version__,
                           "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
