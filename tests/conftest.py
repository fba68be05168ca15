"""Shared fixtures: a temporary MLflow store and decode cache per test, and tiny datasets.
Shared functions are in helpers.py."""

from __future__ import annotations

import os
import pickle
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import (
    CLASSES,
    MLFLOW_SELECTION,
    TEST_PER_CLASS,
    TINY,
    TRAIN_PER_CLASS,
    copy_of_store,
    encode,
    point_mlflow_at,
    synthetic_images,
    unavailable,
)

from cifar_experiments.cli import cli


def pytest_configure(config: pytest.Config) -> None:
    """A pytest-xdist worker shares the machine with another: one thread for torch here and in
    every process it starts, as sweep workers share cores, so neither waits on the other's."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow tests first, the quick ones after: the two workers take whole modules
    in this order (`--no-loadscope-reorder`), so the quick ones fill in at the end whichever
    worker is done first, instead of a long module running alone there."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: each module stays together


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An SQLite store with MLflow's tables made, which takes MLflow about a second: each
    test's store starts as a copy of it."""
    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def tracking_store(tmp_path_factory, monkeypatch, empty_store):
    """A fresh SQLite store per test, run from its folder (where MLflow puts artifacts and
    training its checkpoints, by default); fails the test if it leaves a run active."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = copy_of_store(empty_store, root)
    monkeypatch.chdir(root)
    point_mlflow_at(uri, monkeypatch)
    monkeypatch.setenv("CIFAR_EXPERIMENTS_CACHE", str(root / "cache"))
    for name in MLFLOW_SELECTION:  # a run or experiment an earlier test left selected
        monkeypatch.delenv(name, raising=False)
    yield uri
    active = mlflow.active_run()
    mlflow.end_run()
    assert active is None, f"run {active.info.run_id} was left active"


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 3 MB filesystem (a tmpfs, which root may mount), to fill up."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        unavailable(f"cannot mount a small tmpfs here (root may): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """train/<class>/*.png and test/<class>/*.jpg, the layout of the shared CIFAR-10 copy."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, count, fmt, ext in (
        ("train", TRAIN_PER_CLASS, "PNG", "png"),
        ("test", TEST_PER_CLASS, "JPEG", "jpg"),
    ):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(synthetic_images(count, label, seed=label + len(split))):
                (folder / f"{i:04d}.{ext}").write_bytes(encode(image, fmt))
    return root


@pytest.fixture(scope="session")
def cifar_python_folder(tmp_path_factory) -> Path:
    """A parent folder holding cifar-10-batches-py/ in CIFAR's pickle layout."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()

    def write_batch(name: str, per_class: int, seed: int) -> None:
        images = [synthetic_images(per_class, label, seed + label) for label in range(3)]
        pixels = np.concatenate(images).transpose(0, 3, 1, 2).reshape(3 * per_class, -1)
        labels = [label for label in range(3) for _ in range(per_class)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": pixels, b"labels": labels}, f)

    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [name.encode() for name in CLASSES]}, f)
    write_batch("data_batch_1", TRAIN_PER_CLASS // 2, seed=0)
    write_batch("data_batch_2", TRAIN_PER_CLASS // 2, seed=10)
    write_batch("test_batch", TEST_PER_CLASS, seed=20)
    return root


@pytest.fixture(scope="session")
def finished_run(image_folder, tmp_path_factory, empty_store):
    """One real training on tiny data into its own store, read by many tests."""
    folder = tmp_path_factory.mktemp("store")
    store = copy_of_store(empty_store, folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mp.setenv("CIFAR_EXPERIMENTS_CACHE", str(tmp_path_factory.mktemp("cache")))
        mlflow.set_tracking_uri(store)
        args = ["train", *TINY]
        args += ["--experiment-name", "tiny", "--run-name", "first", "--data", str(image_folder)]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        run = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0]
    return result, mlflow.MlflowClient(store), run.info.run_id


@pytest.fixture
def in_finished_store(finished_run, monkeypatch):
    """Point MLflow's fluent API at the store of `finished_run` for one test."""
    point_mlflow_at(finished_run[1].tracking_uri, monkeypatch)
    return finished_run
