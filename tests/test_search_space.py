"""Search spaces: what a space file may say, and the one-line refusal of what it may not."""

from pathlib import Path

import pytest

from cifar_experiments import search_space
from cifar_experiments.search_space import Choice, Range, SpaceError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_a_space_file_becomes_ranges_and_choices(tmp_path):
    space = search_space.load(
        write(
            tmp_path,
            "lr: {low: 0.01, high: 0.3, log: true}\n"
            "batch_size: [64, 128]\n"
            "seed: {low: 0, high: 4}\n"
            "label_smoothing: {low: 0, high: 0.2, step: 0.1}\n"
            "schedule: [onecycle, cosine]\n"
            "nesterov: [true, false]\n",
        ),
        "tutorial",
    )
    assert space["lr"] == Range(0.01, 0.3, log=True)
    assert space["batch_size"] == Choice((64, 128))
    assert space["seed"] == Range(0, 4, integer=True)
    assert space["label_smoothing"] == Range(0.0, 0.2, step=0.1)
    assert space["schedule"] == Choice(("onecycle", "cosine"))
    assert space["nesterov"] == Choice((True, False))
    assert search_space.grid({k: space[k] for k in ("seed", "label_smoothing", "batch_size")}) == {
        "seed": [0, 1, 2, 3, 4],
        "label_smoothing": [0.0, 0.1, 0.2],
        "batch_size": [64, 128],
    }


@pytest.mark.parametrize("model", ["tutorial", "airbench"])
def test_each_model_has_a_default_space(model):
    space = search_space.load(None, model)
    assert space and set(space) <= set(search_space.SEARCHABLE)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lrr: [0.1]", "cannot search lrr; searchable options: batch_size, lr, momentum"),
        ("epochs: [1, 2]", "cannot search epochs"),
        ("- lr\n- momentum", "must map option names to a range or a list of choices"),
        ("", "must map option names"),
        ("lr: {low: 0.1}", "lr: the range has no high"),
        ("lr: {low: 0.1, high: 0.1}", "lr: the range is empty: low 0.1 is not below high 0.1"),
        ("lr: {low: 0.3, high: 0.1}", "the range is empty"),
        ("lr: {low: 0.1, hi: 0.3}", "lr: unknown key hi"),
        ("lr: 0.1", "lr: give a list of choices or {low, high}"),
        ("lr: []", "lr: the list of choices is empty"),
        ("weight_decay: {low: 0, high: 0.3, log: true}", "a log range needs low above 0"),
        ("lr: {low: -1, high: 0.3}", "lr.low: must be positive, got -1.0"),
        ("batch_size: [64, 12.5]", "batch_size: 12.5 is not an integer"),
        ("batch_size: {low: 32, high: 64.5}", "batch_size.high: 64.5 is not an integer"),
        ("schedule: [onecycle, sometimes]", "schedule: 'sometimes' is not one of onecycle"),
        ("schedule: {low: 1, high: 2}", "schedule: takes a list of choices, not a range"),
        ("nesterov: [yes-ish]", "nesterov: 'yes-ish' is not true or false"),
        ("momentum: [0.9, 0.9]", "momentum: the choices repeat a value"),
        ("lr: {low: 0.1, high: 0.3, log: maybe}", "lr.log: must be true or false"),
        ("lr: [0.1, 0.2\n", "not valid YAML"),
    ],
)
def test_a_bad_space_file_is_refused_naming_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as raised:
        search_space.load(path, "tutorial")
    assert message in str(raised.value)
    assert str(raised.value).startswith(path) and "\n" not in str(raised.value)


def test_a_grid_needs_values_it_can_list():
    space = search_space.parse({"lr": {"low": 0.01, "high": 0.1}}, "space.yaml")
    with pytest.raises(SpaceError, match="grid search: lr: a float range without a step"):
        search_space.grid(space)
