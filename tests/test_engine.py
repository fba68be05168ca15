import pytest
import torch
from conftest import synthetic_images

from cifar_experiments import data, engine, models
from cifar_experiments.config import TrainConfig


class RecordingTracker:
    def __init__(self):
        self.points: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics, step):
        for name, value in metrics.items():
            self.points.setdefault(name, []).append((step, value))


def tiny_set(per_class: int, seed: int) -> data.ImageSet:
    arrays = [synthetic_images(per_class, label, seed + label) for label in range(3)]
    images = torch.from_numpy(__import__("numpy").concatenate(arrays)).permute(0, 3, 1, 2)
    labels = torch.arange(3).repeat_interleave(per_class)
    return data.ImageSet(images.contiguous(), labels)


def test_fit_logs_every_curve_with_steps_and_learns():
    config = TrainConfig(epochs=4, batch_size=8, lr=0.02, log_every=2, seed=1)
    tracker = RecordingTracker()
    torch.manual_seed(0)
    net = models.build_model("tutorial", num_classes=3)
    result = engine.fit(
        config, net, tiny_set(16, 0), tiny_set(4, 100), ("r", "g", "b"), tracker,
        engine.Runtime.resolve("cpu"),
    )  # fmt: skip
    steps_per_epoch = 6  # 48 images, batch 8
    assert [s for s, _ in tracker.points["train/loss"]] == list(range(2, 25, 2))
    for name in ("train/epoch_loss", "train/accuracy", "train/lr", "train/epoch_seconds",
                 "train/images_per_second", "val/loss", "val/accuracy", "val/accuracy_g",
                 "val/f1_macro"):  # fmt: skip
        assert [s for s, _ in tracker.points[name]] == [1, 2, 3, 4], name
    assert result.global_step == 4 * steps_per_epoch
    losses = [v for _, v in tracker.points["train/loss"]]
    assert losses[-1] < losses[0]
    best = max(tracker.points["val/accuracy"], key=lambda p: p[1])
    assert result.best_val.accuracy == best[1]
    assert len(result.history) == 4


def test_best_epoch_weights_are_restored():
    config = TrainConfig(epochs=3, batch_size=8, seed=2)
    net = models.build_model("tutorial", num_classes=3)
    runtime = engine.Runtime.resolve("cpu")
    result = engine.fit(config, net, tiny_set(8, 0), tiny_set(4, 50), ("r", "g", "b"),
                        RecordingTracker(), runtime)  # fmt: skip
    again = engine.evaluate(net, tiny_set(4, 50), ("r", "g", "b"), result.normalization, runtime)
    assert again.accuracy == result.best_val.accuracy
    assert again.loss == pytest.approx(result.best_val.loss, rel=1e-5)


def test_same_seed_same_metrics_on_cpu():
    def run():
        tracker = RecordingTracker()
        torch.manual_seed(0)
        net = models.build_model("tutorial", num_classes=3)
        engine.fit(TrainConfig(epochs=2, batch_size=8, log_every=1, seed=3), net,
                   tiny_set(8, 0), tiny_set(4, 50), ("r", "g", "b"), tracker,
                   engine.Runtime.resolve("cpu"))  # fmt: skip
        return tracker.points["train/loss"]

    assert run() == run()


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules_start_and_end_where_expected(schedule):
    factors = [engine.lr_factor(schedule, s, 100) for s in range(101)]
    assert max(factors) == pytest.approx(1.0)
    assert min(factors) >= 0
    if schedule != "constant":
        assert factors[-1] == pytest.approx(0.0, abs=1e-9)


def test_unavailable_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(engine.DeviceUnavailable, match="cuda"):
        engine.Runtime.resolve("cuda")
    assert engine.Runtime.resolve("auto").device.type in ("cpu", "mps")
