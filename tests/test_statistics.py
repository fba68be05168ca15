"""The statistics decisions rest on, checked against values worked out by other means: sums
of binomial terms, a worked Holm example, and intervals' coverage by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import binomial_tail

from cifar_experiments import statistics

SIMULATIONS = 2000


def answers(both: int, only_a: int, only_b: int, neither: int) -> statistics.Paired:
    """Paired answers with the given counts in each cell of the 2x2 table."""
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return statistics.Paired(np.array(a), np.array(b))


@pytest.mark.parametrize(("only_a", "only_b"), [(12, 3), (3, 12), (7, 7), (40, 25), (1, 0)])
def test_mcnemar_is_the_binomial_tail_of_the_discordant_images(only_a, only_b):
    paired = answers(both=500, only_a=only_a, only_b=only_b, neither=100)
    assert (paired.only_a, paired.only_b, paired.images) == (only_a, only_b, 600 + only_a + only_b)
    assert paired.p_a_better() == pytest.approx(binomial_tail(only_a, only_a + only_b), rel=1e-9)
    two_sided = min(1.0, 2 * binomial_tail(max(only_a, only_b), only_a + only_b))
    assert statistics.mcnemar_two_sided(only_a, only_b) == pytest.approx(two_sided, rel=1e-9)


def test_mcnemar_without_discordant_images_finds_nothing():
    assert statistics.mcnemar_greater(0, 0) == statistics.mcnemar_two_sided(0, 0) == 1.0


def test_holm_matches_a_worked_example():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06
    # (adjusted p-values never fall as the raw ones rise).
    assert statistics.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert statistics.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert statistics.holm([]) == []


def coverage(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def test_the_accuracy_interval_holds_the_true_accuracy_95_times_in_100():
    rng = np.random.default_rng(1)
    images, truth = 300, 0.7
    hits = []
    for right in rng.binomial(images, truth, size=SIMULATIONS):
        low, high = statistics.accuracy_interval(int(right), images)
        hits.append(low <= truth <= high)
    assert 0.93 <= coverage(hits) <= 0.97


def test_the_paired_difference_interval_holds_the_true_difference_95_times_in_100():
    """Correlated pairs, as two models on the same images are: both right 60 %, only A 10 %,
    only B 5 %, neither 25 %; A is truly 5 points better."""
    rng = np.random.default_rng(2)
    cells, truth = [0.60, 0.10, 0.05, 0.25], 0.05
    hits = []
    for counts in rng.multinomial(400, cells, size=SIMULATIONS):
        difference, low, high = answers(*map(int, counts)).difference()
        assert low <= difference <= high
        hits.append(low <= truth <= high)
    assert 0.93 <= coverage(hits) <= 0.97


def test_the_t_interval_over_seeds_holds_the_true_mean_95_times_in_100():
    rng = np.random.default_rng(3)
    hits = []
    for seeds in rng.normal(0.68, 0.01, size=(SIMULATIONS, 3)):
        low, high = statistics.t_interval(seeds)
        hits.append(low <= 0.68 <= high)
    assert 0.93 <= coverage(hits) <= 0.97


def test_pairs_must_be_on_the_same_images():
    with pytest.raises(ValueError, match="same images"):
        statistics.Paired(np.ones(3, dtype=bool), np.ones(4, dtype=bool))


def test_over_seeds_counts_the_images_each_setting_gets_right_more_often():
    """Per image, the share of seeds right; a tie in shares tells nothing. Hand-counted: of six
    images, A's seeds are ahead on two (images 0 and 4), B's on one (image 3)."""
    a = np.array([[1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, 0]], dtype=bool)
    b = np.array([[0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 0]], dtype=bool)
    over = statistics.OverSeeds(a, b)
    assert (over.only_a, over.only_b) == (2, 1)
    assert over.p_value() == pytest.approx(min(1.0, 2 * binomial_tail(2, 3)), rel=1e-9)


def test_over_one_seed_is_mcnemar():
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 1, 400)) < [[[0.7]], [[0.6]]]
    paired = statistics.Paired(a[0], b[0])
    over = statistics.OverSeeds(a, b)
    assert (over.only_a, over.only_b) == (paired.only_a, paired.only_b)
    assert over.p_value() == statistics.mcnemar_two_sided(paired.only_a, paired.only_b)
