"""`compare A B` and the gate at registration, on hand-made predictions and on tiny runs."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY, binomial_tail
from helpers import hand_made_predictions as predictions

from cifar_experiments import comparison
from cifar_experiments.cli import cli

NAME = "gated"


def test_a_report_gives_each_accuracy_the_difference_and_the_classes():
    labels = [0] * 100 + [1] * 100 + [2] * 100
    a_right = [True] * 90 + [False] * 10 + [True] * 60 + [False] * 40 + [True] * 80 + [False] * 20
    b_right = [True] * 90 + [True] * 10 + [True] * 60 + [False] * 40 + [True] * 50 + [False] * 50
    report = comparison.compare("A", predictions(a_right, labels), "B",
                                predictions(b_right, labels), "val")  # fmt: skip
    assert (report.images, report.only_a, report.only_b) == (300, 30, 10)
    assert report.accuracy_a == pytest.approx(230 / 300) and report.accuracy_b == pytest.approx(0.7)
    assert report.difference == pytest.approx(20 / 300)
    low, high = report.difference_interval
    assert low < report.difference < high and low > 0  # A is better: the interval is above 0
    assert report.interval_a[0] < report.accuracy_a < report.interval_a[1]
    assert report.p_value == pytest.approx(2 * binomial_tail(30, 40))
    cat, dog, frog = report.classes
    assert (cat.only_a, cat.only_b, dog.only_a, dog.only_b) == (0, 10, 0, 0)
    assert frog.only_a == 30 and frog.significant and not dog.significant
    assert frog.p_value == pytest.approx(2 * binomial_tail(30, 30))
    text = report.text()
    assert "p = " in text and "A right where B is wrong: 30 images" in text
    assert text.splitlines()[-2].endswith("*")  # frog, the one class that changed for sure


def train(image_folder, *args: str) -> str:
    result = CliRunner().invoke(
        cli, ["train", *TINY, "--data", str(image_folder), "--val-fraction", "0.5",
              "--model-name", NAME, *args],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


def run_id(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("Run ")).split()[1]


def test_two_seeds_of_one_setting_are_compared_and_gated_image_by_image(image_folder, tmp_path):
    first = run_id(train(image_folder, "--seed", "0"))
    output = train(image_folder, "--seed", "1")
    second = run_id(output)
    client = mlflow.MlflowClient()
    version = client.get_model_version(NAME, "2")
    tags = version.tags
    only_new, only_old = map(int, tags["gate.discordant"].split("/"))
    p_value = binomial_tail(only_new, only_new + only_old) if only_new + only_old else 1.0
    assert float(tags["gate.p_value"]) == pytest.approx(p_value, rel=1e-3)
    assert tags["gate.compared_with"] == "1" and tags["gate.images"] == "15"
    assert tags["gate.verdict"] == ("promoted" if p_value < 0.05 else "kept")
    assert f"p = {p_value:.2g}" in output  # the line the training prints says why
    assert client.list_artifacts(second, "gate")[0].path == "gate/per_class_vs_version_1.json"

    result = CliRunner().invoke(
        cli, ["compare", first, f"models:/{NAME}/2", "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "15 val images held out by both" in result.output and "p = " in result.output
    numbers = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert (numbers["only_a"], numbers["only_b"]) == (only_old, only_new)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("0" * 32, "there is no run"),
        (f"models:/{NAME}/9", "there is no model"),
        (f"models:/{NAME}@nobody", "there is no model"),
    ],
)
def test_a_reference_to_nothing_is_one_line(reference, message):
    result = CliRunner().invoke(cli, ["compare", reference, reference])
    assert result.exit_code == 1 and "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]  # MLflow may first say it made the store
    assert last.startswith("Error: ") and message in last


def test_the_flipped_images_are_drawn_and_their_absence_said(tmp_path):
    labels = [0, 1, 2, 0, 1, 2]
    a = predictions([True, True, False, False, True, True], labels)
    b = predictions([True, False, True, False, True, True], labels)
    images = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
    figure = comparison.flips_figure("A", a, "B", b, images)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["dog\nA right, B: frog", "frog\nB right, A: cat"]
    assert comparison.flips_figure("A", a, "A again", a, images) is None
    said = comparison.write_flips("A", a, "B", b, "val", tmp_path / "gone", tmp_path)
    assert said.startswith("No pictures: the runs' data") and "--data" in said
    assert not (tmp_path / "flipped.png").exists()
