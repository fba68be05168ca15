"""Champion decisions from two runs' predictions on the held-out images both share, settled by
paired statistics rather than by one noisy number. Nothing of MLflow: registry.py fetches the
predictions and moves the alias.

    significant  the candidate is right more often on the shared images (exact one-sided
                 McNemar test at `alpha`) and no class's recall is significantly worse
                 (one-sided McNemar within each class, Holm-corrected at `alpha`)
    better       a higher validation accuracy, however small (the rule before the gate)
    off          the alias never moves
"""

from __future__ import annotations

from dataclasses import dataclass

from . import comparison, statistics
from .predictions import Predictions

# What a version's registration decided, as its tags.
VERDICT_TAG, P_VALUE_TAG, IMAGES_TAG = "gate.verdict", "gate.p_value", "gate.images"
COMPARED_WITH_TAG, DISCORDANT_TAG = "gate.compared_with", "gate.discordant"


@dataclass(frozen=True)
class ClassChange:
    """One class's recall for both models on the shared images, and whether it fell."""

    name: str
    images: int
    candidate_recall: float
    champion_recall: float
    p_worse: float  # one-sided McNemar within the class: the candidate is worse
    p_adjusted: float  # Holm-corrected over the classes
    regressed: bool


@dataclass(frozen=True)
class Comparison:
    """A candidate against a champion on the held-out images both hold."""

    images: int
    only_candidate: int  # images the candidate gets right and the champion wrong
    only_champion: int
    candidate_accuracy: float
    champion_accuracy: float
    p_value: float  # one-sided exact McNemar: the candidate is better
    classes: tuple[ClassChange, ...]

    @property
    def points(self) -> float:
        """How many points of accuracy the candidate is ahead (negative: behind)."""
        return 100 * (self.candidate_accuracy - self.champion_accuracy)

    @property
    def regressed(self) -> tuple[str, ...]:
        return tuple(change.name for change in self.classes if change.regressed)

    def table(self) -> dict[str, list[object]]:
        """The per-class changes, a column each, as MLflow's tables take them."""
        return {
            "class": [c.name for c in self.classes],
            "images": [c.images for c in self.classes],
            "candidate_recall": [c.candidate_recall for c in self.classes],
            "champion_recall": [c.champion_recall for c in self.classes],
            "p_worse": [c.p_worse for c in self.classes],
            "p_worse_holm": [c.p_adjusted for c in self.classes],
            "regressed": [c.regressed for c in self.classes],
        }


def compare(candidate: Predictions, champion: Predictions, alpha: float) -> Comparison | None:
    """The candidate against the champion on the images both held out; None if they share
    none (other data, say)."""
    report = comparison.compare("candidate", candidate, "champion", champion, "val", alpha)
    if report is None:
        return None
    # One-sided within each class: only a fall counts against the candidate.
    p_worse = [statistics.mcnemar_greater(c.only_b, c.only_a) for c in report.classes]
    adjusted = statistics.holm(p_worse)
    return Comparison(
        images=report.images,
        only_candidate=report.only_a,
        only_champion=report.only_b,
        candidate_accuracy=report.accuracy_a,
        champion_accuracy=report.accuracy_b,
        p_value=statistics.mcnemar_greater(report.only_a, report.only_b),
        classes=tuple(
            ClassChange(c.name, c.images, c.recall_a, c.recall_b, p, q, q < alpha)
            for c, p, q in zip(report.classes, p_worse, adjusted, strict=True)
        ),
    )


@dataclass(frozen=True)
class Decision:
    """Whether `champion` moves to the candidate, and the one line that says why."""

    verdict: str  # promoted, kept, first, not_comparable (and manual, by `promote`)
    line: str
    compared_with: str | None = None  # the champion's version
    comparison: Comparison | None = None

    @property
    def promotes(self) -> bool:
        return self.verdict in ("promoted", "first")

    def tags(self) -> dict[str, str]:
        tags = {VERDICT_TAG: self.verdict}
        if self.compared_with is not None:
            tags[COMPARED_WITH_TAG] = self.compared_with
        if self.comparison is not None:
            tags[P_VALUE_TAG] = f"{self.comparison.p_value:.4g}"
            tags[IMAGES_TAG] = str(self.comparison.images)
            tags[DISCORDANT_TAG] = (
                f"{self.comparison.only_candidate}/{self.comparison.only_champion}"
            )
        return tags


@dataclass(frozen=True)
class Candidate:
    """A version up for `champion`: its number, its validation accuracy (the run's own
    figure) and its predictions, if its run saved any."""

    version: str
    val_accuracy: float
    predictions: Predictions | None


def decide(rule: str, alpha: float, candidate: Candidate, champion: Candidate | None) -> Decision:
    """Whether `champion` moves from `champion` (None: there is none yet) to `candidate`."""
    new = f"version {candidate.version}"
    if champion is None:
        if rule == "off":
            return Decision("kept", f"no champion: the gate is off, so {new} is not made one")
        return Decision("first", f"champion -> {new}, the first")
    comparison = None
    if candidate.predictions is not None and champion.predictions is not None:
        comparison = compare(candidate.predictions, champion.predictions, alpha)
    held = f"champion stays on version {champion.version}"
    if rule == "off":
        return Decision("kept", f"{held}: the gate is off", champion.version, comparison)
    if rule == "better":
        better = candidate.val_accuracy > champion.val_accuracy
        how = (
            f"validation accuracy {candidate.val_accuracy:.2%} against {champion.val_accuracy:.2%}"
        )
        line = f"champion -> {new} ({how})" if better else f"{held}: {new} has {how}"
        return Decision("promoted" if better else "kept", line, champion.version, comparison)
    if comparison is None:
        why = _why_not_comparable(candidate, champion)
        return Decision("not_comparable", f"{held}: {new} {why}", champion.version)
    direction = "better" if comparison.points >= 0 else "worse"
    evidence = (
        f"{new} is {abs(comparison.points):.1f} points {direction} on {comparison.images:,} "
        f"shared images, p = {comparison.p_value:.2g}"
    )
    if comparison.p_value >= alpha:
        return Decision("kept", f"{held}: {evidence}", champion.version, comparison)
    if comparison.regressed:
        worse = ", ".join(comparison.regressed)
        return Decision("kept", f"{held}: {evidence}, but {worse} got significantly worse",
                        champion.version, comparison)  # fmt: skip
    return Decision("promoted", f"champion -> {new}: {evidence}", champion.version, comparison)


def _why_not_comparable(candidate: Candidate, champion: Candidate) -> str:
    for who in (candidate, champion):
        if who.predictions is None:
            return (
                f"cannot be compared: version {who.version}'s run saved no per-image "
                "predictions (trained before they were saved)"
            )
    return "shares no held-out images with it (other data)"
