"""Every run judged on the same images: the validation split has a seed of its own and is
nested, and each run saves what it answered for every held-out image."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from helpers import CLASSES, TEST_PER_CLASS, TRAIN_PER_CLASS

from cifar_experiments import data, experiment
from cifar_experiments.config import TrainConfig
from cifar_experiments.evaluation import Evaluation
from cifar_experiments.predictions import Predictions, shared_images


def labels_of(counts: list[int]) -> np.ndarray:
    return np.array([label for label, n in enumerate(counts) for _ in range(n)])


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_a_smaller_fraction_holds_out_a_subset_of_what_a_larger_one_holds_out(seed):
    labels = labels_of([500, 300, 41])
    small = data.held_out(labels, 0.02, seed)
    large = data.held_out(labels, 0.1, seed)
    assert set(small) < set(large)
    assert np.bincount(labels[large]).tolist() == [50, 30, 4]  # a tenth of every class
    assert np.bincount(labels[small]).tolist() == [10, 6, 1]


def test_the_split_follows_the_split_seed_not_the_training_seed(image_folder):
    def held(**options) -> np.ndarray:
        config = TrainConfig(epochs=1, batch_size=8, data=str(image_folder), **options)
        return experiment.prepare(config).val_ids

    assert np.array_equal(held(seed=0), held(seed=5))
    labels = labels_of([100, 100, 100])
    assert not np.array_equal(data.held_out(labels, 0.1, 0), data.held_out(labels, 0.1, 1))


def evaluation(labels: list[int], predicted: list[int], true_scores: list[float]) -> Evaluation:
    labels_array = np.array(labels)
    return Evaluation(CLASSES, labels_array, np.array(predicted), np.ones(len(labels)), 0.1,
                      np.array(true_scores))  # fmt: skip


def test_predictions_round_trip_and_line_up_on_shared_images():
    a = Predictions.of(evaluation([0, 1, 2, 1], [0, 2, 2, 1], [0.9, 0.2, 0.7, 0.6]),
                       np.array([3, 8, 11, 20]), "digest")  # fmt: skip
    again = Predictions.from_bytes(a.to_bytes())
    assert again.example_ids.tolist() == [3, 8, 11, 20] and again.data_digest == "digest"
    assert again.right.tolist() == [True, False, True, True]
    assert again.p_true.tolist() == pytest.approx([0.9, 0.2, 0.7, 0.6])
    b = Predictions.of(evaluation([1, 2], [1, 0], [0.8, 0.1]), np.array([20, 11]), "digest")
    shared = shared_images(a, b)
    assert shared.tolist() == [11, 20]
    assert a.on(shared).right.tolist() == [True, True]
    assert b.on(shared).right.tolist() == [False, True]
    other_data = Predictions.of(evaluation([1], [1], [0.8]), np.array([20]), "another")
    assert shared_images(a, other_data).size == 0


def test_a_run_saves_its_answer_for_every_held_out_image(in_finished_store, image_folder):
    _, client, run_id = in_finished_store
    run = client.get_run(run_id)
    dataset = data.load_dataset(str(image_folder))
    for split, images, metric in (
        ("val", len(CLASSES), "val/best_accuracy"),  # a tenth of ten images of each class
        ("test", len(CLASSES) * TEST_PER_CLASS, "test_accuracy"),
    ):
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"evaluation/{split}/predictions.npz"
        )
        with open(path, "rb") as saved:
            predictions = Predictions.from_bytes(saved.read())
        assert len(predictions.example_ids) == images
        assert (
            predictions.data_digest == dataset.digest == run.inputs.dataset_inputs[0].dataset.digest
        )
        source = dataset.train if split == "val" else dataset.test
        assert torch.equal(
            source.labels[torch.from_numpy(predictions.example_ids)],
            torch.from_numpy(predictions.labels.astype(np.int64)),
        )
        assert ((predictions.p_true > 0) & (predictions.p_true <= 1)).all()
        assert predictions.right.mean() == pytest.approx(run.data.metrics[metric])
    assert TRAIN_PER_CLASS == 10  # the validation count above: one image of each class
