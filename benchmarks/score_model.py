"""Score a logged or registered model on a folder of held-out images, sent as their file bytes.

    python benchmarks/score_model.py runs:/<run_id>/model /path/to/test   # test/<class>/*.jpg

Prints the accuracy and the time per image. The folder's class names must be the model's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlflow
import pandas as pd


def accuracy(model_uri: str, folder: str) -> tuple[int, int, float]:
    """Images labelled correctly, images, and seconds taken to label them."""
    files = sorted(p for p in Path(folder).glob("*/*") if p.is_file())
    truth = [p.parent.name for p in files]
    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"image": [p.read_bytes() for p in files]})
    started = time.perf_counter()
    labels = pd.concat([model.predict(frame.iloc[i : i + 500]) for i in range(0, len(frame), 500)])[
        "label"
    ].tolist()
    seconds = time.perf_counter() - started
    correct = sum(label == true for label, true in zip(labels, truth, strict=True))
    return correct, len(files), seconds


def main(model_uri: str, folder: str) -> None:
    correct, total, seconds = accuracy(model_uri, folder)
    print(
        f"{model_uri}: {correct}/{total} correct = {correct / total:.2%} "
        f"({1000 * seconds / total:.2f} ms per image)"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
