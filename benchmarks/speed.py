"""Speed against the tutorial's own loop, measured as ratios in one run on one machine.

    python benchmarks/speed.py /path/to/image-folder      # train/<class>/*, test/<class>/*

Measures (1) one epoch of the tutorial's loop as the tutorial writes it (DataLoader, batch 4,
two workers, ToTensor + Normalize per image, SGD 0.001/0.9), once before the rest and once
after; (2) this project's training of the same Net with the defaults, per epoch (the median
of the epochs' own times, each its training steps, validation and logging) and per epoch of
the whole training loop (its setup and final evaluation spread over the epochs), and a whole
`mlflow run` of 10 epochs start to finish; (3) the same training with MLflow tracking and
with a tracker that records nothing, interleaved. Prints the ratios and the test accuracy,
and rewrites the results table in benchmarks/README.md. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared toolbox
import mlflow
import torch
import tutorial
from helpers import local_env
from PIL import Image

from cifar_experiments import data, engine, experiment, speedups
from cifar_experiments.callbacks import Tracker
from cifar_experiments.config import TrainConfig
from cifar_experiments.tracking import lifecycle

ROOT = Path(__file__).resolve().parents[1]
RESULTS_START, RESULTS_END = "<!-- results -->", "<!-- /results -->"


class TutorialDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: array -> PIL image -> the tutorial's transform."""

    def __init__(self, images: data.ImageSet) -> None:
        self.arrays = images.images.permute(0, 2, 3, 1).numpy()
        self.labels = images.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return tutorial.transform(Image.fromarray(self.arrays[i])), self.labels[i]


def tutorial_epoch(train: data.ImageSet) -> float:
    """Seconds for one epoch of the tutorial's training loop, its loss printout included."""
    loader = torch.utils.data.DataLoader(
        TutorialDataset(train), batch_size=4, shuffle=True, num_workers=2
    )
    return tutorial.train_epoch(tutorial.Net(), loader)


@dataclass
class Timing:
    loop: float  # the whole training loop's wall time (setup and final evaluation too) / epochs
    epochs: list[float]  # each epoch's own time: its training steps, validation and logging
    # What tracking itself took, per epoch: training's waits in the tracker's calls, and the
    # CPU time of the process's other Python threads (MLflow's system-metrics sampler).
    in_tracker: float
    other_threads: float


class Stopwatch(engine.Callback):
    """Hands every moment on to `tracker` and adds up the time training waits for it."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker, self.seconds = tracker, 0.0

    def on_step_end(self, state: engine.TrainingState, metrics: dict[str, float]) -> None:
        started = time.perf_counter()
        self.tracker.on_step_end(state, metrics)
        self.seconds += time.perf_counter() - started

    def on_epoch_end(self, state: engine.TrainingState, epoch: int, metrics: dict) -> None:
        started = time.perf_counter()
        self.tracker.on_epoch_end(state, epoch, metrics)
        self.seconds += time.perf_counter() - started

    def on_train_end(self, state: engine.TrainingState) -> None:
        started = time.perf_counter()
        self.tracker.on_train_end(state)
        self.seconds += time.perf_counter() - started


def other_threads_cpu() -> dict[int, float]:
    """CPU seconds so far of each Python thread but this one (PyTorch's own are not Python's)."""
    times = {}
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.ident is not None:
            with contextlib.suppress(OSError):  # it may have ended meanwhile
                clock = time.pthread_getcpuclockid(thread.ident)
                times[thread.ident] = time.clock_gettime(clock)
    return times


def train(prepared: experiment.Prepared, tracker: Tracker) -> Timing:
    config = prepared.config
    stopwatch = Stopwatch(tracker)
    threads_before = other_threads_cpu()
    started = time.perf_counter()
    state = engine.TrainingState.create(
        config, prepared.train, prepared.dataset.classes, prepared.runtime
    )
    result = engine.fit(state, prepared.val, [stopwatch])
    loop = (time.perf_counter() - started) / config.epochs
    threads = sum(t - threads_before.get(i, 0.0) for i, t in other_threads_cpu().items())
    return Timing(
        loop,
        [h["train/epoch_seconds"] for h in result.history],
        stopwatch.seconds / config.epochs,
        threads / config.epochs,
    )


def train_tracked(prepared: experiment.Prepared) -> Timing:
    with lifecycle.mlflow_run(prepared.config) as tracker:
        return train(prepared, tracker)


def mlflow_run(folder: str, store: str, epochs: int) -> tuple[float, float]:
    """(seconds start to finish, test accuracy) of `mlflow run` with the defaults."""
    env = local_env(MLFLOW_TRACKING_URI=store)
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # set by mlflow.set_experiment in this process
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
               "--experiment-name", "speed-mlflow-run", "-P", f"epochs={epochs}",
               "-P", f"data={folder}", "-P", "register=false"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    runs = mlflow.search_runs(experiment_names=["speed-mlflow-run"])
    return seconds, float(runs["metrics.test_accuracy"].iloc[0])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


# Each speed trick timed off against on, with the model it is for and the training images
# timed (airbench on a subset: its epochs are minutes). "bf16 autocast" is what
# `precision=auto` picks on CPUs with native bf16; off means fp32.
TRICKS = [
    ("pairwise_max_pool", "tutorial", None),
    ("channels_last", "tutorial", None),
    ("bf16 autocast", "tutorial", None),
    ("channels_last", "airbench", 4096),
    ("reuse_freed_memory", "airbench", 4096),
    ("bf16 autocast", "airbench", 4096),
]
TRICK_EPOCHS = 2


def epoch_seconds(folder: str, model: str, images: int | None, precision: str) -> float:
    """The median epoch of a short training, without tracking (run in a process of its own,
    as some tricks set up the whole process)."""
    config = TrainConfig(model=model, epochs=TRICK_EPOCHS, data=folder, precision=precision)
    prepared = experiment.prepare(config)
    train_set = prepared.train
    if images is not None:
        train_set = data.stratified_split(train_set, images / len(train_set), config.seed)[1]
    state = engine.TrainingState.create(config, train_set, prepared.dataset.classes,
                                        prepared.runtime)  # fmt: skip
    return statistics.median(
        h["train/epoch_seconds"] for h in engine.fit(state, prepared.val).history
    )


def timed_child(folder: str, model: str, images: int | None, off: str | None) -> float:
    precision = "fp32" if off == "bf16 autocast" else "auto"
    env = {**os.environ, speedups.DISABLE_ENV: off if off in speedups.SPEEDUPS else ""}
    command = [sys.executable, __file__, folder, "--child", model, str(images or 0), precision]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def trick_rows(folder: str, repeats: int) -> list[tuple[str, str, str]]:
    """A row per trick: the median over `repeats` pairs, run in turns first, of (epoch with it
    on) / (epoch with it off)."""
    bf16_here = engine.Runtime.resolve("cpu").bf16
    rows = []
    for trick, model, images in TRICKS:
        if trick == "bf16 autocast" and not bf16_here:
            rows.append((f"{trick}, {model}", "not used here", "precision=auto picks fp32"))
            continue
        ratios = []
        for repeat in range(repeats):
            order = [None, trick] if repeat % 2 else [trick, None]
            seconds = {off: timed_child(folder, model, images, off) for off in order}
            ratios.append(seconds[None] / seconds[trick])
            print(f"  {trick} ({model}): on {seconds[None]:.2f} s, off {seconds[trick]:.2f} s "
                  "an epoch", flush=True)  # fmt: skip
        on_images = f"{images:,} images" if images else "the whole split"
        rows.append((f"{trick}, {model} ({on_images})", f"{statistics.median(ratios):.2f}",
                     f"epoch time on / off, median of {repeats} pairs "
                     f"({min(ratios):.2f} to {max(ratios):.2f})"))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", help="image folder with train/ and test/")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--trick-repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "IMAGES", "PRECISION"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.child:
        model, images, precision = args.child
        print(epoch_seconds(args.folder, model, int(images) or None, precision))
        return

    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(store)
        os.environ["MLFLOW_TRACKING_URI"] = store
        config = TrainConfig(epochs=args.epochs, data=args.folder, register=False)
        prepared = experiment.prepare(config)

        tutorial_epochs = [tutorial_epoch(prepared.train)]
        print(f"tutorial loop: {tutorial_epochs[-1]:.1f} s an epoch", flush=True)
        # Interleaved repetitions: the machine's speed drifts by more than the effect.
        untracked: list[Timing] = []
        tracked: list[Timing] = []
        for repeat in range(args.repeats):
            # Each pair runs back to back, in turns first, so a machine that drifts slower or
            # faster does not favour one side.
            if repeat % 2:
                tracked.append(train_tracked(prepared))
                untracked.append(train(prepared, Tracker()))
            else:
                untracked.append(train(prepared, Tracker()))
                tracked.append(train_tracked(prepared))
            print(f"project, tracker off / MLflow: loop {untracked[-1].loop:.2f} / "
                  f"{tracked[-1].loop:.2f} s an epoch; median epoch "
                  f"{statistics.median(untracked[-1].epochs):.2f} / "
                  f"{statistics.median(tracked[-1].epochs):.2f} s", flush=True)  # fmt: skip
        # Once before and once after, as the machine's speed drifts over minutes.
        tutorial_epochs.append(tutorial_epoch(prepared.train))
        print(f"tutorial loop again: {tutorial_epochs[-1]:.1f} s an epoch", flush=True)
        tutorial = statistics.mean(tutorial_epochs)
        untracked_epoch = statistics.median(e for t in untracked for e in t.epochs)
        tracked_epoch = statistics.median(e for t in tracked for e in t.epochs)
        untracked_loop = statistics.median(t.loop for t in untracked)
        # Each pair's ratio is free of the drift between pairs.
        pair_overheads = [t.loop / u.loop - 1 for t, u in zip(tracked, untracked, strict=True)]
        overhead = statistics.median(pair_overheads)
        # The same, accounted directly rather than as the difference of two noisy timings.
        accounted = statistics.median(
            (t.in_tracker + t.other_threads - u.in_tracker - u.other_threads) / u.loop
            for t, u in zip(tracked, untracked, strict=True)
        )
        waits = statistics.median(t.in_tracker for t in tracked)
        threads = statistics.median(t.other_threads for t in tracked)
        whole, accuracy = mlflow_run(args.folder, store, args.epochs)
        print(f"mlflow run, {args.epochs} epochs, start to finish: {whole:.1f} s, test "
              f"{accuracy:.2%}")  # fmt: skip

    rows = [
        ("tutorial loop, one epoch (mean of one before and one after)", f"{tutorial:.1f} s "
         f"({' and '.join(f'{t:.1f}' for t in tutorial_epochs)})", "1x"),
        ("project defaults, one epoch (tracker off)", f"{untracked_epoch:.2f} s",
         f"{tutorial / untracked_epoch:.1f}x faster"),
        ("project defaults, one epoch (MLflow tracking)", f"{tracked_epoch:.2f} s",
         f"{tutorial / tracked_epoch:.1f}x faster"),
        ("project defaults, whole training loop / epochs (tracker off)",
         f"{untracked_loop:.2f} s", f"{tutorial / untracked_loop:.1f}x faster"),
        (f"`mlflow run`, {args.epochs} epochs, start to finish", f"{whole:.1f} s",
         f"{whole / (2 * tutorial):.2f} of the tutorial's 2 epochs"),
        ("tracking overhead per epoch", f"{100 * overhead:+.1f} %",
         f"median over {args.repeats} back-to-back pairs, in turns first (from "
         f"{100 * min(pair_overheads):+.0f} to {100 * max(pair_overheads):+.0f} %)"),
        ("tracking's own time per epoch, accounted", f"{100 * accounted:+.1f} %",
         f"{1000 * waits:.1f} ms in its calls, {1000 * threads:.1f} ms CPU in MLflow's threads"),
        ("test accuracy of that `mlflow run`", f"{accuracy:.2%}", ""),
    ]  # fmt: skip
    print("speed tricks, each off against on:", flush=True)
    tricks = trick_rows(args.folder, args.trick_repeats)
    table = "\n".join(
        [f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, data `{args.folder}`.", "",
         "| measurement | value | ratio |", "| --- | --- | --- |",
         *(f"| {a} | {b} | {c} |" for a, b, c in rows), "",
         "Each speed trick (`cifar_experiments/speedups.py`; bf16 is `precision=auto`'s "
         "choice), in processes of their own:", "",
         "| trick, model | epoch time, on / off | how measured |", "| --- | --- | --- |",
         *(f"| {a} | {b} | {c} |" for a, b, c in tricks)]
    )  # fmt: skip
    print(table)
    readme = ROOT / "benchmarks" / "README.md"
    text = readme.read_text()
    start, end = text.index(RESULTS_START) + len(RESULTS_START), text.index(RESULTS_END)
    readme.write_text(f"{text[:start]}\n{table}\n{text[end:]}")


if __name__ == "__main__":
    main()
