"""Score a logged or registered model on a folder of held-out images, sent as their file bytes.

    python benchmarks/score_model.py runs:/<run_id>/model /path/to/test   # test/<class>/*.jpg

Prints the accuracy and the time per image, labelling every image in one `predict` call and
then in calls of 500. The folder's class names must be the model's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlflow
import pandas as pd


def accuracy(model_uri: str, folder: str, per_call: int | None = None) -> tuple[int, int, float]:
    """Images labelled correctly, images, and seconds taken to label them: all in one call,
    or `per_call` images at a time."""
    files = sorted(p for p in Path(folder).glob("*/*") if p.is_file())
    truth = [p.parent.name for p in files]
    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"image": [p.read_bytes() for p in files]})
    step = per_call or len(frame)
    started = time.perf_counter()
    answers = [model.predict(frame.iloc[i : i + step]) for i in range(0, len(frame), step)]
    seconds = time.perf_counter() - started
    labels = pd.concat(answers)["label"].tolist()
    correct = sum(label == true for label, true in zip(labels, truth, strict=True))
    return correct, len(files), seconds


def main(model_uri: str, folder: str) -> None:
    for per_call in (None, 500):
        correct, total, seconds = accuracy(model_uri, folder, per_call)
        calls = f"{per_call} images a call" if per_call else "one call"
        print(
            f"{model_uri}, {calls}: {correct}/{total} correct = {correct / total:.2%} "
            f"({1000 * seconds / total:.2f} ms per image)"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
