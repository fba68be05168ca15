"""Speed against the tutorial's own loop, measured as ratios in one run on one machine.

    python benchmarks/speed.py /path/to/image-folder      # train/<class>/*, test/<class>/*

Measures (1) one epoch of the tutorial's loop as the tutorial writes it (DataLoader, batch 4,
two workers, ToTensor + Normalize per image, SGD 0.001/0.9); (2) this project's training of
the same Net with the defaults, per epoch, and a whole `mlflow run` of 10 epochs start to
finish; (3) the same training with MLflow tracking and with a tracker that records nothing.
Prints the ratios and the test accuracy, and rewrites the results table in
benchmarks/README.md. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch
import torchvision.transforms as T
from PIL import Image

from cifar_experiments import data, experiment, models, tracking
from cifar_experiments.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS_START, RESULTS_END = "<!-- results -->", "<!-- /results -->"


class TutorialDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: array -> PIL image -> transform."""

    def __init__(self, images: data.ImageSet) -> None:
        self.arrays = images.images.permute(0, 2, 3, 1).numpy()
        self.labels = images.labels.tolist()
        self.transform = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.arrays[i])), self.labels[i]


def tutorial_epoch(train: data.ImageSet) -> float:
    """Seconds for one epoch of the tutorial's training loop."""
    loader = torch.utils.data.DataLoader(
        TutorialDataset(train), batch_size=4, shuffle=True, num_workers=2
    )
    net = models.Net()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    started = time.perf_counter()
    for inputs, labels in loader:
        optimizer.zero_grad()
        loss = criterion(net(inputs), labels)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def project_training(config: TrainConfig, tracked: bool) -> tuple[float, float]:
    """(mean training seconds per epoch, test accuracy) of one run with the project's code."""
    prepared = experiment.prepare(config)
    if tracked:
        summary = experiment.train(prepared)
        history = mlflow.MlflowClient().get_metric_history(summary.run_id, "train/epoch_seconds")
        seconds = [m.value for m in history]
    else:
        recorder = _EpochSeconds()
        summary = experiment.run(prepared, recorder)
        seconds = recorder.seconds
    return sum(seconds) / len(seconds), summary.test_accuracy or float("nan")


class _EpochSeconds(tracking.Tracker):
    """Records nothing but each epoch's wall time."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "train/epoch_seconds" in metrics:
            self.seconds.append(metrics["train/epoch_seconds"])


def mlflow_run_seconds(folder: str, store: str) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
               "-P", "epochs=10", "-P", f"data={folder}", "-P", "register=false"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", help="image folder with train/ and test/")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(store)
        os.environ["MLFLOW_TRACKING_URI"] = store
        config = TrainConfig(epochs=args.epochs, data=args.folder, register=False)
        prepared = experiment.prepare(config)

        tutorial = tutorial_epoch(prepared.train)
        print(f"tutorial loop: {tutorial:.1f} s an epoch", flush=True)
        untracked, untracked_acc = project_training(config, tracked=False)
        print(f"project, tracker off: {untracked:.2f} s an epoch, test {untracked_acc:.2%}")
        tracked, tracked_acc = project_training(config, tracked=True)
        print(f"project, MLflow tracking: {tracked:.2f} s an epoch, test {tracked_acc:.2%}")
        whole = mlflow_run_seconds(args.folder, store)
        print(f"mlflow run, {args.epochs} epochs, start to finish: {whole:.1f} s")

    rows = [
        ("tutorial loop, one epoch", f"{tutorial:.1f} s", "1x"),
        ("project defaults, one epoch (tracker off)", f"{untracked:.2f} s",
         f"{tutorial / untracked:.1f}x faster"),
        ("project defaults, one epoch (MLflow tracking)", f"{tracked:.2f} s",
         f"{tutorial / tracked:.1f}x faster"),
        (f"`mlflow run`, {args.epochs} epochs, start to finish", f"{whole:.1f} s",
         f"{whole / (2 * tutorial):.2f} of the tutorial's 2 epochs"),
        ("tracking overhead per epoch", f"{100 * (tracked / untracked - 1):+.1f} %", ""),
        ("test accuracy, project defaults", f"{tracked_acc:.2%}", ""),
    ]  # fmt: skip
    table = "\n".join(
        [f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, data `{args.folder}`.", "",
         "| measurement | value | ratio |", "| --- | --- | --- |",
         *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    )  # fmt: skip
    print(table)
    readme = ROOT / "benchmarks" / "README.md"
    text = readme.read_text()
    start, end = text.index(RESULTS_START) + len(RESULTS_START), text.index(RESULTS_END)
    readme.write_text(f"{text[:start]}\n{table}\n{text[end:]}")


if __name__ == "__main__":
    main()
