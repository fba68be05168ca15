"""`compare A B`: two models on the images both held out, as numbers and in words: each
accuracy with its interval, the paired difference with its interval and McNemar's p-value,
per-class recall side by side, and the images each gets right that the other gets wrong."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from . import statistics
from .data import DataError, load_dataset
from .evaluation import image_grid
from .predictions import Predictions, shared_images
from .statistics import percent


@dataclass(frozen=True)
class ClassRecall:
    name: str
    images: int
    recall_a: float
    recall_b: float
    only_a: int  # images of the class A gets right and B wrong
    only_b: int
    p_value: float  # two-sided exact McNemar within the class
    p_adjusted: float  # Holm-corrected over the classes
    significant: bool


@dataclass(frozen=True)
class Report:
    a: str
    b: str
    split: str
    images: int
    accuracy_a: float
    interval_a: tuple[float, float]
    accuracy_b: float
    interval_b: tuple[float, float]
    difference: float  # A's accuracy minus B's
    difference_interval: tuple[float, float]
    only_a: int  # images A gets right and B wrong
    only_b: int
    p_value: float  # two-sided exact McNemar: do they differ at all?
    classes: tuple[ClassRecall, ...]
    alpha: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        width = max(len(self.a), len(self.b), len("class"))
        lines = [f"{self.images:,} {self.split} images held out by both:"]
        for name, accuracy, bounds in (
            (self.a, self.accuracy_a, self.interval_a),
            (self.b, self.accuracy_b, self.interval_b),
        ):
            lines.append(
                f"  {name:<{width}}  {percent(accuracy)} (95 % interval {_points(bounds)})"
            )
        lines += [
            f"A - B: {100 * self.difference:+.2f} points (95 % interval "
            f"{_points(self.difference_interval, signed=True)}), McNemar p = {self.p_value:.2g}",
            f"A right where B is wrong: {self.only_a:,} images; B right where A is wrong: "
            f"{self.only_b:,}",
            "",
            f"  {'class':<{width}}  {'A':>8}  {'B':>8}  p (Holm)",
        ]
        for change in self.classes:
            mark = "  *" if change.significant else ""
            lines.append(
                f"  {change.name:<{width}}  {percent(change.recall_a):>8}  "
                f"{percent(change.recall_b):>8}  {change.p_adjusted:.2g}{mark}"
            )
        lines.append(f"* recall differs at the {self.alpha:g} level, Holm-corrected over classes")
        return "\n".join(lines)


def _points(bounds: tuple[float, float], signed: bool = False) -> str:
    low, high = (100 * bound for bound in bounds)
    return f"[{low:+.2f}, {high:+.2f}]" if signed else f"[{low:.2f}, {high:.2f}]"


def compare(
    a_name: str, a: Predictions, b_name: str, b: Predictions, split: str,
    alpha: float = 0.05,
) -> Report | None:  # fmt: skip
    """A against B on the images both predicted for; None when they share none."""
    shared = shared_images(a, b)
    if shared.size == 0:
        return None
    ours, theirs = a.on(shared), b.on(shared)
    paired = statistics.Paired(ours.right, theirs.right)
    per_class = []
    for label, name in enumerate(a.classes):
        mask = ours.labels == label
        within = statistics.Paired(ours.right[mask], theirs.right[mask])
        per_class.append((name, within))
    p_values = [statistics.mcnemar_two_sided(w.only_a, w.only_b) for _, w in per_class]
    adjusted = statistics.holm(p_values)
    difference, low, high = paired.difference()
    return Report(
        a=a_name, b=b_name, split=split, images=paired.images,
        accuracy_a=float(paired.a_right.mean()),
        interval_a=statistics.accuracy_interval(int(paired.a_right.sum()), paired.images),
        accuracy_b=float(paired.b_right.mean()),
        interval_b=statistics.accuracy_interval(int(paired.b_right.sum()), paired.images),
        difference=difference, difference_interval=(low, high),
        only_a=paired.only_a, only_b=paired.only_b,
        p_value=statistics.mcnemar_two_sided(paired.only_a, paired.only_b),
        classes=tuple(
            ClassRecall(name, w.images, _recall(w.a_right), _recall(w.b_right), w.only_a,
                        w.only_b, p, q, q < alpha)
            for (name, w), p, q in zip(per_class, p_values, adjusted, strict=True)
        ),
        alpha=alpha,
    )  # fmt: skip


def _recall(right: Any) -> float:
    return float(right.mean()) if len(right) else float("nan")


def flips_figure(
    a_name: str, a: Predictions, b_name: str, b: Predictions, images: np.ndarray,
    count: int = 16,
) -> Figure | None:  # fmt: skip
    """The images one model gets right and the other wrong (up to `count` of each), each with
    its true class and what the wrong one said; None when they never disagree so. `images`
    are the split's images (uint8, N, 3, H, W), indexed by example id."""
    shared = shared_images(a, b)
    ours, theirs = a.on(shared), b.on(shared)
    picked, captions = [], []
    for winner, loser, mine, other in (("A", "B", ours, theirs), ("B", "A", theirs, ours)):
        flipped = np.flatnonzero(mine.right & ~other.right)
        if len(flipped) > count:  # spread over them all: the images come class by class
            flipped = flipped[np.linspace(0, len(flipped) - 1, count).astype(int)]
        picked += list(shared[flipped])
        names = a.classes
        captions += [
            f"{names[other.labels[i]]}\n{winner} right, {loser}: {names[other.predicted[i]]}"
            for i in flipped
        ]
    if not picked:
        return None
    title = f"Images one gets right and the other wrong: A = {a_name}, B = {b_name}"
    return image_grid(images[np.array(picked)], captions, title)


def write_flips(
    a_name: str, a: Predictions, b_name: str, b: Predictions, split: str,
    data: str | Path | None, folder: Path,
) -> str:  # fmt: skip
    """Draw the images one model gets right and the other wrong into folder/flipped.png, from
    the data the runs were trained on; say what was written, or why not."""
    if data is None or not Path(data).exists():
        return f"No pictures: the runs' data ({data}) is not here; give --data PATH"
    try:
        dataset = load_dataset(data)
    except DataError as error:
        return f"No pictures: {error}"
    pool = dataset.train if split == "val" else dataset.test
    if dataset.digest != a.data_digest or pool is None:
        return f"No pictures: {data} is not the data the runs were trained on"
    figure = flips_figure(a_name, a, b_name, b, pool.images.numpy())
    if figure is None:
        return "No pictures: neither gets an image right that the other gets wrong"
    path = folder / "flipped.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return f"Written: {path}"
