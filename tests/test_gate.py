"""The champion gate on hand-made predictions: significant, not significant, a class that got
worse, versions that cannot be compared, the first version, and the other rules."""

from __future__ import annotations

import pytest
from helpers import CLASSES, binomial_tail, hand_made_predictions

from cifar_experiments import gate
from cifar_experiments.predictions import Predictions


def pair(
    cells: dict[int, tuple[int, int, int, int]], digest: str = "data"
) -> tuple[Predictions, Predictions]:
    """Candidate and champion predictions on the same images: for each class, how many images
    (both right, only the candidate right, only the champion right, neither)."""
    labels, candidate_right, champion_right = [], [], []
    for label, (both, only_candidate, only_champion, neither) in cells.items():
        labels += [label] * (both + only_candidate + only_champion + neither)
        candidate_right += [True] * (both + only_candidate) + [False] * (only_champion + neither)
        champion_right += [True] * both + [False] * only_candidate + [True] * only_champion
        champion_right += [False] * neither

    def predictions(right: list[bool]) -> Predictions:
        ids = [3 * image for image in range(len(labels))]  # ids need not be 0..n-1
        return hand_made_predictions(right, labels, ids, digest)

    return predictions(candidate_right), predictions(champion_right)


def candidates(cells, val=(0.7, 0.6)) -> tuple[gate.Candidate, gate.Candidate]:
    new, old = pair(cells)
    return gate.Candidate("2", val[0], new), gate.Candidate("1", val[1], old)


def test_a_significantly_better_version_is_promoted_and_its_tags_say_why():
    new, old = candidates({0: (300, 20, 10, 30), 1: (250, 20, 10, 30), 2: (250, 20, 10, 30)})
    decision = gate.decide("significant", 0.05, new, old)
    assert decision.verdict == "promoted" and decision.promotes
    p_value = binomial_tail(60, 90)
    assert decision.comparison.p_value == pytest.approx(p_value)
    assert decision.tags() == {
        "gate.verdict": "promoted", "gate.compared_with": "1", "gate.p_value": f"{p_value:.4g}",
        "gate.images": "980", "gate.discordant": "60/30",
    }  # fmt: skip
    assert decision.line == (
        "champion -> version 2: version 2 is 3.1 points better on 980 shared images, "
        f"p = {p_value:.2g}"
    )


def test_a_version_that_is_not_significantly_better_leaves_the_champion():
    new, old = candidates({0: (300, 12, 10, 30), 1: (300, 12, 10, 30), 2: (300, 11, 10, 30)})
    decision = gate.decide("significant", 0.05, new, old)
    p_value = binomial_tail(35, 65)
    assert decision.verdict == "kept" and not decision.promotes
    assert decision.comparison.p_value == pytest.approx(p_value) and p_value > 0.05
    assert decision.line == (
        f"champion stays on version 1: version 2 is 0.5 points better on 1,055 shared images, "
        f"p = {p_value:.2g}"
    )


def test_a_class_that_got_significantly_worse_keeps_the_champion():
    """Better overall (p far below 0.05), but every frog the champion got right and the
    candidate got wrong: the frog class regresses after Holm's correction."""
    new, old = candidates({0: (200, 60, 0, 10), 1: (200, 60, 0, 10), 2: (200, 0, 25, 10)})
    decision = gate.decide("significant", 0.05, new, old)
    assert decision.comparison.p_value < 0.001
    frog = decision.comparison.classes[2]
    assert frog.p_worse == pytest.approx(0.5**25)
    assert frog.p_adjusted == pytest.approx(min(1.0, 3 * 0.5**25)) and frog.regressed
    assert decision.comparison.regressed == ("frog",)
    assert decision.verdict == "kept" and decision.line.endswith("but frog got significantly worse")
    table = decision.comparison.table()
    assert table["class"] == list(CLASSES) and table["regressed"] == [False, False, True]
    assert table["champion_recall"][2] == pytest.approx(225 / 235)


def test_versions_of_other_data_or_without_predictions_are_not_comparable():
    new, _ = pair({0: (10, 5, 0, 1)})
    _, other_data = pair({0: (10, 5, 0, 1)}, digest="other")
    decision = gate.decide(
        "significant", 0.05, gate.Candidate("2", 0.9, new), gate.Candidate("1", 0.5, other_data)
    )
    assert decision.verdict == "not_comparable" and not decision.promotes
    assert (
        decision.line
        == "champion stays on version 1: version 2 shares no held-out images with it (other data)"
    )
    assert decision.tags() == {"gate.verdict": "not_comparable", "gate.compared_with": "1"}
    legacy = gate.decide(
        "significant", 0.05, gate.Candidate("2", 0.9, new), gate.Candidate("1", 0.5, None)
    )
    assert legacy.verdict == "not_comparable"
    assert "version 1's run saved no per-image predictions" in legacy.line


def test_the_first_version_becomes_champion_unless_the_gate_is_off():
    new, _ = pair({0: (10, 5, 0, 1)})
    first = gate.decide("significant", 0.05, gate.Candidate("1", 0.5, new), None)
    assert first.verdict == "first" and first.promotes and first.tags() == {"gate.verdict": "first"}
    off = gate.decide("off", 0.05, gate.Candidate("1", 0.5, new), None)
    assert off.verdict == "kept" and not off.promotes


@pytest.mark.parametrize(("val", "verdict"), [((0.61, 0.6), "promoted"), ((0.6, 0.6), "kept")])
def test_the_better_rule_follows_validation_accuracy_however_small_the_difference(val, verdict):
    new, old = candidates({0: (300, 10, 12, 30)}, val=val)
    decision = gate.decide("better", 0.05, new, old)
    assert decision.verdict == verdict
    assert decision.comparison is not None, "the paired figures are still recorded"


def test_the_gate_off_never_moves_the_champion():
    new, old = candidates({0: (100, 90, 0, 10)})
    assert gate.decide("off", 0.05, new, old).verdict == "kept"
