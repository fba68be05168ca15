"""`compare A B`: two models on the images both held out, as numbers and in words: each
accuracy with its interval, the paired difference with its interval and McNemar's p-value,
per-class recall side by side, and the images each gets right that the other gets wrong."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import statistics
from .predictions import Predictions, shared_images


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
                f"  {name:<{width}}  {_percent(accuracy)} (95 % interval {_points(bounds)})"
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
                f"  {change.name:<{width}}  {_percent(change.recall_a):>8}  "
                f"{_percent(change.recall_b):>8}  {change.p_adjusted:.2g}{mark}"
            )
        lines.append(f"* recall differs at the {self.alpha:g} level, Holm-corrected over classes")
        return "\n".join(lines)


def _percent(value: float) -> str:
    return f"{100 * value:.2f} %"


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
