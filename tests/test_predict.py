"""The `predict` command: image files or folders in, a table or JSON out."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import CLASSES, encode, synthetic_images

from cifar_experiments.cli import cli


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    images = synthetic_images(3, 1, 42)
    (folder / "a.png").write_bytes(encode(images[0], "PNG"))
    (folder / "nested" / "b.jpg").write_bytes(encode(images[1], "JPEG"))
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    single = tmp_path / "c.jpeg"
    single.write_bytes(encode(images[2], "JPEG"))
    return folder, single


def predict(*args: str):
    return CliRunner().invoke(cli, ["predict", *args])


def test_table_for_files_and_folders_from_the_champion(in_finished_store, photos):
    folder, single = photos
    result = predict(str(single), str(folder))  # default model: cifar10-classifier@champion
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["file", "label", "score"]
    assert [line.split()[0] for line in lines[1:]] == [
        str(single), str(folder / "a.png"), str(folder / "nested" / "b.jpg"),
    ]  # fmt: skip
    assert all(line.split()[1] in CLASSES and line.endswith("%") for line in lines[1:])


def test_json_from_any_model_uri(in_finished_store, photos):
    _, _, run_id = in_finished_store
    _, single = photos
    result = predict("--json", "--model", f"runs:/{run_id}/model", str(single))
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert record["file"] == str(single) and record["label"] in CLASSES
    assert sum(record[f"prob_{c}"] for c in CLASSES) == pytest.approx(1.0)


def test_missing_file_is_a_usage_error_naming_it(tmp_path):
    result = predict(str(tmp_path / "ghost.png"))
    assert result.exit_code == 2 and "ghost.png" in result.output


def test_non_image_file_is_a_usage_error_naming_it(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    result = predict(str(fake))
    assert result.exit_code == 2
    assert "fake.jpg: not a readable image" in result.output and "Traceback" not in result.output


def test_folder_without_images_is_a_usage_error(tmp_path):
    result = predict(str(tmp_path))
    assert result.exit_code == 2 and "no image files" in result.output


def test_unknown_model_is_a_clear_error(photos):
    _, single = photos
    result = predict("--model", "models:/nobody@champion", str(single))
    assert result.exit_code == 1
    assert "cannot use model models:/nobody@champion" in result.output
    assert "Traceback" not in result.output
