import json

import numpy as np

from cifar_experiments.evaluation import Evaluation, curves_figure


def make() -> Evaluation:
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.4, 0.3])
    return Evaluation(("a", "b", "c"), labels, predictions, scores, loss=0.5)


def test_confusion_rows_are_true_classes():
    ev = make()
    assert ev.confusion().tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert ev.per_class_accuracy() == {"a": 0.75, "b": 0.5, "c": 1.0}
    assert ev.accuracy == 0.75


def test_metrics_include_macro_scores_and_every_class():
    metrics = make().metrics()
    assert metrics["loss"] == 0.5 and metrics["accuracy"] == 0.75
    assert metrics["recall_macro"] == (0.75 + 0.5 + 1.0) / 3
    assert {"precision_macro", "f1_macro", "accuracy_a", "accuracy_b", "accuracy_c"} <= set(metrics)


def test_confusion_json_has_counts_and_row_shares():
    payload = json.loads(json.dumps(make().confusion_json()))
    assert payload["classes"] == ["a", "b", "c"]
    assert payload["normalized"][1] == [0.5, 0.5, 0.0]


def test_figures_are_drawn(tmp_path):
    make().confusion_figure("val").savefig(tmp_path / "cm.png")
    history = [
        {"epoch": e, "train/epoch_loss": 1 / e, "val/loss": 1 / e, "train/accuracy": e / 10,
         "val/accuracy": e / 10}
        for e in (1, 2)
    ]  # fmt: skip
    curves_figure(history).savefig(tmp_path / "curves.png")
    assert (tmp_path / "cm.png").stat().st_size > 1000
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_per_class_table_has_a_row_per_class_and_what_each_is_taken_for():
    table = make().per_class_table()
    assert table["class"] == ["a", "b", "c"]
    assert table["recall"] == [0.75, 0.5, 1.0]
    assert table["images"] == [4, 2, 2]
    assert table["most_often_taken_for"] == ["b", "a", None]


def test_mistakes_gallery_shows_the_most_confident_mistakes_first(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    figure = make().mistakes_figure(images, "test", count=1)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["b\n-> a 95%"]  # image 5 (0.95) before image 3 (0.6)
    assert "1 most confident of 2 mistakes" in figure._suptitle.get_text()
    right = make()
    right = Evaluation(right.classes, right.labels, right.labels, right.scores, right.loss)
    assert right.mistakes_figure(images, "test") is None
