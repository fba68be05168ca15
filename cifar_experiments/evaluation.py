"""Scores of a set of predictions and the pictures people look at: scikit-learn and matplotlib."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen needed; figures only go to files

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix


@dataclass(frozen=True)
class Evaluation:
    """How a model did on one split: mean loss and what it predicted for each image."""

    classes: tuple[str, ...]
    labels: np.ndarray
    predictions: np.ndarray
    scores: np.ndarray  # the probability the model gave each prediction
    loss: float
    true_scores: np.ndarray | None = None  # the probability it gave each image's true class

    @property
    def accuracy(self) -> float:
        return float((self.labels == self.predictions).mean())

    def confusion(self) -> np.ndarray:
        """Counts: row = true class, column = predicted class."""
        return confusion_matrix(self.labels, self.predictions, labels=range(len(self.classes)))

    def per_class_accuracy(self) -> dict[str, float]:
        counts = self.confusion()
        totals = counts.sum(axis=1)
        return {
            name: float(counts[i, i] / totals[i]) if totals[i] else float("nan")
            for i, name in enumerate(self.classes)
        }

    def report(self) -> dict[str, Any]:
        return classification_report(
            self.labels,
            self.predictions,
            labels=range(len(self.classes)),
            target_names=self.classes,
            output_dict=True,
            zero_division=0,
        )

    def report_text(self) -> str:
        return classification_report(
            self.labels,
            self.predictions,
            labels=range(len(self.classes)),
            target_names=self.classes,
            digits=4,
            zero_division=0,
        )

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a metric store: loss, accuracy, macro P/R/F1, accuracy per class."""
        macro = self.report()["macro avg"]
        scores = {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "precision_macro": macro["precision"],
            "recall_macro": macro["recall"],
            "f1_macro": macro["f1-score"],
        }
        scores.update({f"accuracy_{name}": acc for name, acc in self.per_class_accuracy().items()})
        return scores

    def per_class_table(self) -> dict[str, list[Any]]:
        """One row per class, as columns: the scores a sortable table shows, and the class
        its images were most often taken for."""
        report, counts = self.report(), self.confusion()
        mistaken = counts - np.diag(np.diag(counts))
        table: dict[str, list[Any]] = {
            "class": [], "recall": [], "precision": [], "f1": [], "images": [],
            "most_often_taken_for": [],
        }  # fmt: skip
        for i, name in enumerate(self.classes):
            row = report[name]
            table["class"].append(name)
            table["recall"].append(round(row["recall"], 4))
            table["precision"].append(round(row["precision"], 4))
            table["f1"].append(round(row["f1-score"], 4))
            table["images"].append(int(row["support"]))
            taken_for = int(mistaken[i].argmax())
            table["most_often_taken_for"].append(
                self.classes[taken_for] if mistaken[i, taken_for] else None
            )
        return table

    def confusion_json(self) -> dict[str, Any]:
        counts = self.confusion()
        return {
            "classes": list(self.classes),
            "rows": "true class",
            "columns": "predicted class",
            "counts": counts.tolist(),
            "normalized": _row_normalize(counts).round(4).tolist(),
        }

    def confusion_figure(self, title: str) -> Figure:
        counts = self.confusion()
        fig, axes = plt.subplots(1, 2, figsize=(17, 7.5), layout="constrained")
        for ax, values, fmt, subtitle in (
            (axes[0], counts, "d", "counts"),
            (axes[1], _row_normalize(counts), ".2f", "share of each true class"),
        ):
            ConfusionMatrixDisplay(values, display_labels=self.classes).plot(
                ax=ax, cmap="Blues", values_format=fmt, colorbar=False, xticks_rotation=45
            )
            ax.set_title(subtitle)
        fig.suptitle(f"{title}: accuracy {self.accuracy:.2%} on {len(self.labels)} images")
        return fig

    def shares_figure(self, title: str) -> Figure:
        """The confusion matrix as shares of each true class: small enough to draw every
        epoch, and on one colour scale from epoch to epoch."""
        fig, ax = plt.subplots(figsize=(6.4, 5.6), layout="constrained")
        ConfusionMatrixDisplay(_row_normalize(self.confusion()), display_labels=self.classes).plot(
            ax=ax, cmap="Blues", values_format=".2f", colorbar=False, xticks_rotation=45,
            im_kw={"vmin": 0, "vmax": 1},
        )  # fmt: skip
        ax.set_title(f"{title}: accuracy {self.accuracy:.2%}")
        return fig

    def mistakes_figure(self, images: np.ndarray, title: str, count: int = 24) -> Figure | None:
        """The `count` mistakes made with the highest scores, each image with its true class,
        the class predicted and the score; None when there is no mistake.

        `images` are the evaluated images, uint8 (N, 3, H, W).
        """
        wrong = np.flatnonzero(self.labels != self.predictions)
        if not len(wrong):
            return None
        shown = wrong[np.argsort(-self.scores[wrong], kind="stable")][:count]
        captions = [
            f"{self.classes[self.labels[i]]}\n-> {self.classes[self.predictions[i]]} "
            f"{self.scores[i]:.0%}"
            for i in shown
        ]
        return image_grid(
            images[shown], captions,
            f"{title}: the {len(shown)} most confident of {len(wrong)} mistakes "
            "(true class -> predicted class, score)",
        )  # fmt: skip


def image_grid(images: np.ndarray, captions: list[str], title: str, columns: int = 8) -> Figure:
    """Images (uint8, N, 3, H, W), each with its caption, in rows of `columns`."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(columns * 1.5, rows * 1.85), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    return fig


def curves_figure(history: list[dict[str, float]]) -> Figure:
    """Loss and accuracy per epoch, training against validation."""
    epochs = [h["epoch"] for h in history]
    # Training numbers come from augmented batches as the weights move; validation from the
    # bare network at the epoch's end, which is why it can sit above training.
    train_label, val_label = "train (augmented batches, during the epoch)", "validation"
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    loss_ax.plot(epochs, [h["train/epoch_loss"] for h in history], "o-", label=train_label)
    loss_ax.plot(epochs, [h["val/loss"] for h in history], "o-", label=val_label)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.plot(epochs, [h["train/accuracy"] for h in history], "o-", label=train_label)
    acc_ax.plot(epochs, [h["val/accuracy"] for h in history], "o-", label=val_label)
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def seeds_figure(curves: dict[int, list[tuple[int, float]]]) -> Figure:
    """Validation accuracy per epoch of each seed of one setting, on one chart."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for seed, points in sorted(curves.items()):
        ax.plot(*zip(*points, strict=True), "o-", label=f"seed {seed}")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="each seed's validation curve")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _row_normalize(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
