"""What a run answered for each image of a split, saved so that two runs can later be compared
image by image (gate.py, `compare`). One compact file per split, `predictions.npz`:

    example_id  the image's index among the data's training images (validation) or test images
    classes     the class names, in label order
    label       its true class
    predicted   the class the logged model predicts (with its test-time augmentation)
    p_true      the probability it gives the true class
    data_digest, split_digest   which data, and which of its images
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass

import numpy as np

from .evaluation import Evaluation

FILE = "predictions.npz"


def split_digest(data_digest: str, ids: np.ndarray) -> str:
    """A short fingerprint of which images of which data a split holds."""
    h = hashlib.sha256(data_digest.encode())
    h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Predictions:
    classes: tuple[str, ...]
    example_ids: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    p_true: np.ndarray
    data_digest: str
    split_digest: str

    @classmethod
    def of(cls, evaluation: Evaluation, ids: np.ndarray, data_digest: str) -> Predictions:
        """`evaluation`'s answers for the images `ids` of the data `data_digest`, in order."""
        if evaluation.true_scores is None or len(ids) != len(evaluation.labels):
            raise ValueError("an evaluation with its true-class scores, one per id")
        return cls(
            evaluation.classes,
            np.asarray(ids, dtype=np.int64),
            evaluation.labels.astype(np.int16),
            evaluation.predictions.astype(np.int16),
            evaluation.true_scores.astype(np.float32),
            data_digest,
            split_digest(data_digest, ids),
        )

    @property
    def right(self) -> np.ndarray:
        return self.labels == self.predicted

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, classes=np.array(self.classes), example_id=self.example_ids.astype(np.int32),
            label=self.labels,
            predicted=self.predicted, p_true=self.p_true,
            data_digest=np.array(self.data_digest), split_digest=np.array(self.split_digest),
        )  # fmt: skip
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, content: bytes) -> Predictions:
        # Plain arrays only: nothing in the file may run code as it is read.
        with np.load(io.BytesIO(content), allow_pickle=False) as saved:
            return cls(
                tuple(str(name) for name in saved["classes"]),
                saved["example_id"].astype(np.int64), saved["label"], saved["predicted"],
                saved["p_true"], str(saved["data_digest"]), str(saved["split_digest"]),
            )  # fmt: skip

    def on(self, ids: np.ndarray) -> Predictions:
        """These predictions for the images `ids` only (each must be among them), in that order."""
        where = {int(example): row for row, example in enumerate(self.example_ids)}
        rows = np.array([where[int(example)] for example in ids], dtype=np.int64)
        ids = self.example_ids[rows]
        return Predictions(
            self.classes, ids, self.labels[rows], self.predicted[rows], self.p_true[rows],
            self.data_digest, split_digest(self.data_digest, ids),
        )  # fmt: skip


def shared_images(first: Predictions, *others: Predictions) -> np.ndarray:
    """The images all of them predicted for, sorted; none unless they are of the same data."""
    if any(o.data_digest != first.data_digest or o.classes != first.classes for o in others):
        return np.array([], dtype=np.int64)
    return functools.reduce(np.intersect1d, (o.example_ids for o in others),
                            np.unique(first.example_ids))  # fmt: skip
