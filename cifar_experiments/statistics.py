"""Exact tests and intervals for telling two models apart on the same images (scipy.stats).
Nothing of MLflow: the inputs are which images each model got right.

On paired images only the discordant ones (one model right, the other wrong) tell the models
apart; McNemar's exact test asks whether they split more unevenly than a fair coin would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Paired:
    """Two models' answers on the same images: whether each got each image right."""

    a_right: np.ndarray  # bool, one per image
    b_right: np.ndarray

    def __post_init__(self) -> None:
        if self.a_right.shape != self.b_right.shape:
            raise ValueError("paired answers must be on the same images")

    @property
    def images(self) -> int:
        return len(self.a_right)

    @property
    def only_a(self) -> int:
        """Images A gets right and B gets wrong."""
        return int((self.a_right & ~self.b_right).sum())

    @property
    def only_b(self) -> int:
        return int((~self.a_right & self.b_right).sum())

    def p_a_better(self) -> float:
        """One-sided exact McNemar p-value for "A is right more often than B"."""
        return mcnemar_greater(self.only_a, self.only_b)

    def difference(self, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
        """A's accuracy minus B's, with its interval (Newcombe's score interval for paired
        proportions, method 10)."""
        return paired_difference_interval(self.a_right, self.b_right, confidence)


def mcnemar_greater(only_a: int, only_b: int) -> float:
    """The exact one-sided McNemar test: a binomial test that A wins more than half of the
    discordant images. 1.0 when there are none."""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(only_a, discordant, 0.5, alternative="greater").pvalue)


def mcnemar_two_sided(only_a: int, only_b: int) -> float:
    """The exact two-sided McNemar test: do the models differ at all?"""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(only_a, discordant, 0.5).pvalue)


@dataclass(frozen=True)
class OverSeeds:
    """Two settings, each trained with several seeds, on the same images: per image, the share
    of each setting's seeds that got it right. An image tells them apart when one setting's
    seeds get it right more often than the other's (with one seed each: McNemar's discordant
    images)."""

    a_right: np.ndarray  # bool, seeds x images
    b_right: np.ndarray

    @property
    def only_a(self) -> int:
        """Images A's seeds get right more often than B's."""
        return int((self.a_right.mean(axis=0) > self.b_right.mean(axis=0)).sum())

    @property
    def only_b(self) -> int:
        return int((self.a_right.mean(axis=0) < self.b_right.mean(axis=0)).sum())

    def p_value(self) -> float:
        """Two-sided exact sign test on the images that tell them apart: is either setting
        ahead on more of them than a fair coin would give?"""
        return mcnemar_two_sided(self.only_a, self.only_b)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment for testing several hypotheses at once: compare each
    adjusted p-value with the level meant for one. Returned in the order given."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def accuracy_interval(
    right: int, images: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Wilson's score interval for an accuracy of `right` out of `images`."""
    interval = stats.binomtest(right, images).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def paired_difference_interval(
    a_right: np.ndarray, b_right: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """A's accuracy minus B's on the same images, with Newcombe's (1998) hybrid score
    interval: each accuracy's Wilson interval, joined with the correlation of the pairs."""
    n = len(a_right)
    both = int((a_right & b_right).sum())
    only_a = int((a_right & ~b_right).sum())
    only_b = int((~a_right & b_right).sum())
    neither = n - both - only_a - only_b
    p_a, p_b = (both + only_a) / n, (both + only_b) / n
    low_a, high_a = accuracy_interval(both + only_a, n, confidence)
    low_b, high_b = accuracy_interval(both + only_b, n, confidence)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p_a - low_a) ** 2 - 2 * phi * (p_a - low_a) * (high_b - p_b)
                          + (high_b - p_b) ** 2))  # fmt: skip
    above = math.sqrt(max(0.0, (high_a - p_a) ** 2 - 2 * phi * (high_a - p_a) * (p_b - low_b)
                          + (p_b - low_b) ** 2))  # fmt: skip
    difference = p_a - p_b
    return difference, max(-1.0, difference - below), min(1.0, difference + above)


def percent(share: float) -> str:
    """An accuracy as the reports write it: 61.23 %."""
    return f"{100 * share:.2f} %"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t interval for the mean of a few values (seeds of one setting)."""
    sample = np.asarray(values, dtype=float)
    mean = float(sample.mean())
    if len(sample) < 2:
        return mean, mean
    half = stats.t.ppf((1 + confidence) / 2, len(sample) - 1) * stats.sem(sample)
    return mean - float(half), mean + float(half)
