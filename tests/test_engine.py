import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import synthetic_images

from cifar_experiments import checkpoint, data, engine, models
from cifar_experiments.checkpoint import CheckpointFile
from cifar_experiments.config import TrainConfig
from cifar_experiments.interrupts import Interrupted, StopRequests


class RecordingTracker:
    def __init__(self):
        self.points: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics, step):
        for name, value in metrics.items():
            self.points.setdefault(name, []).append((step, value))

    def flush(self):
        pass


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
    assert result.kept_epoch == best[0]
    assert len(result.history) == 4


def test_best_epoch_weights_are_restored():
    config = TrainConfig(epochs=3, batch_size=8, seed=2)
    net = models.build_model("tutorial", num_classes=3)
    runtime = engine.Runtime.resolve("cpu")
    result = engine.fit(config, net, tiny_set(8, 0), tiny_set(4, 50), ("r", "g", "b"),
                        RecordingTracker(), runtime)  # fmt: skip
    again = engine.evaluate(net, tiny_set(4, 50), ("r", "g", "b"), result.normalization, runtime)
    assert again.accuracy == result.kept_val.accuracy
    assert again.loss == pytest.approx(result.kept_val.loss, rel=1e-5)


@pytest.mark.parametrize(("keep_epoch", "kept"), [("best", 1), ("last", 3)])
def test_keep_epoch_chooses_whose_weights_the_model_ends_with(monkeypatch, keep_epoch, kept):
    config = TrainConfig(epochs=3, batch_size=8, seed=2, keep_epoch=keep_epoch)
    net = models.build_model("tutorial", num_classes=3)
    evaluate, epoch_curves = engine.evaluate, []

    def first_epoch_validates_best(model, images, classes, normalization, runtime, tta=True):
        result = evaluate(model, images, classes, normalization, runtime, tta)
        if not tta:  # a point of the validation curve: every epoch after the first scores 0
            epoch_curves.append(result)
            if len(epoch_curves) > 1:
                return replace(result, predictions=(result.labels + 1) % len(classes))
        return result

    weights_at = {}

    class WeightsAtEachEpoch(RecordingTracker):
        def log_metrics(self, metrics, step):
            if "val/accuracy" in metrics:
                weights_at[step] = {k: v.clone() for k, v in net.state_dict().items()}

    monkeypatch.setattr(engine, "evaluate", first_epoch_validates_best)
    result = engine.fit(config, net, tiny_set(8, 0), tiny_set(4, 50), ("r", "g", "b"),
                        WeightsAtEachEpoch(), engine.Runtime.resolve("cpu"))  # fmt: skip
    assert result.kept_epoch == kept
    assert not torch.equal(weights_at[1]["fc3.weight"], weights_at[3]["fc3.weight"])
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, weights_at[kept][name]), name


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


@pytest.mark.parametrize("name", ["tutorial", "airbench"])
def test_a_few_steps_on_tiny_data_lower_the_loss(name):
    # The model's own recipe, shortened; batch small enough for several steps.
    config = TrainConfig(model=name, epochs=3, batch_size=16, log_every=1, seed=0)
    tracker = RecordingTracker()
    torch.manual_seed(0)
    net = models.build_model(name, num_classes=3)
    engine.fit(config, net, tiny_set(16, 0), tiny_set(4, 100), ("r", "g", "b"), tracker,
               engine.Runtime.resolve("cpu"))  # fmt: skip
    epoch_losses = [v for _, v in tracker.points["train/epoch_loss"]]
    assert epoch_losses[-1] < epoch_losses[0]


def test_airbench_whitening_bias_trains_for_its_first_epochs_only(monkeypatch):
    monkeypatch.setattr(models.Airbench, "whiten_bias_epochs", 1)
    # Without lookahead, which would go on averaging the frozen bias with its slow copy.
    config = TrainConfig(model="airbench", epochs=3, batch_size=16, lookahead=False, seed=0)
    net = models.build_model("airbench", num_classes=3)
    biases = []

    class BiasAfterEachEpoch(RecordingTracker):
        def log_metrics(self, metrics, step):
            if "val/accuracy" in metrics:
                biases.append(net.whiten.bias.detach().clone())

    engine.fit(config, net, tiny_set(16, 0), tiny_set(4, 100), ("r", "g", "b"),
               BiasAfterEachEpoch(), engine.Runtime.resolve("cpu"))  # fmt: skip
    assert biases[0].abs().sum() > 0  # it starts at zero and trained in epoch 1
    assert torch.equal(biases[1], biases[0]) and torch.equal(biases[2], biases[0])
    assert not net.whiten.bias.requires_grad


def test_lookahead_restarts_the_weights_from_their_slow_average():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    lookahead = engine.Lookahead(net, total_steps=10, every=5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    lookahead.step(4)  # not a sync step: nothing moves
    assert net.weight.flatten().tolist() == [1.0, 1.0]
    lookahead.step(5)  # halfway: keeps 0.95**5 * 0.5**3 of the slow copy
    keep = 0.95**5 * 0.5**3
    torch.testing.assert_close(net.weight, torch.full((1, 2), 1 - keep))
    torch.testing.assert_close(lookahead.slow["weight"], net.weight)


def test_batch_norm_parameters_get_the_models_learning_rate_scale():
    config = TrainConfig(model="airbench", lr=0.5, weight_decay=1e-3)
    net = models.build_model("airbench")
    groups = engine.make_optimizer(config, net).param_groups
    norm_biases = [m.bias for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    norm_group = next(g for g in groups if any(p is norm_biases[0] for p in g["params"]))
    assert len(norm_group["params"]) == len(norm_biases)  # weights are frozen, not trained
    assert norm_group["lr"] == pytest.approx(0.5 * net.norm_lr_scale)
    assert norm_group["weight_decay"] == pytest.approx(1e-3 / net.norm_lr_scale)
    assert all(g["nesterov"] for g in groups)
    trained = sum(p.numel() for g in groups for p in g["params"])
    assert trained == sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_bf16_is_used_only_where_asked_or_native():
    assert engine.Runtime.resolve("cpu", "fp32").bf16 is False
    assert engine.Runtime.resolve("cpu", "bf16").bf16 is True
    native = torch.cpu.get_capabilities().get("avx512_bf16", False)
    assert engine.Runtime.resolve("cpu", "auto").bf16 is bool(native)


FAULTS_OF_LARGE_TENSORS = """
import resource, torch
from cifar_experiments import engine

def faults_of_five_large_tensors():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 2**20)  # 64 MiB, written through, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_five_large_tensors()
default = faults_of_five_large_tensors()
engine.Runtime.resolve("cpu").prepare_model(torch.nn.Linear(1, 1))
faults_of_five_large_tensors()
print(default, faults_of_five_large_tensors())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_cpu_training_reuses_freed_memory_instead_of_faulting_it_in_again():
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_LARGE_TENSORS], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    default, reused = map(int, out.split())
    if default < 5 * 1000:
        pytest.skip(f"this kernel maps large blocks in few faults ({default})")
    assert reused < default / 20


class StopAtStep(RecordingTracker):
    """Raises the stop flag, as a SIGINT would, once the training loss of `step` is logged."""

    def __init__(self, stop: StopRequests, step: int):
        super().__init__()
        self.stop, self.step = stop, step

    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        if "train/loss" in metrics and step == self.step:
            self.stop.pending = signal.SIGINT


TIMINGS = {"train/epoch_seconds", "train/images_per_second"}


@pytest.mark.parametrize(("name", "stop_step"), [("tutorial", 5), ("airbench", 6)])
def test_interrupted_and_resumed_training_equals_an_uninterrupted_one(
    tmp_path, monkeypatch, name, stop_step
):
    # 3 steps an epoch: step 5 stops mid-epoch, step 6 at an epoch's end. Airbench brings
    # lookahead, flips that alternate by epoch, batch-norm statistics and (from epoch 2 here)
    # a frozen whitening bias into the state.
    monkeypatch.setattr(models.Airbench, "whiten_bias_epochs", 1)
    config = TrainConfig(model=name, epochs=3, batch_size=8, log_every=1, seed=4)
    runtime = engine.Runtime.resolve("cpu", "fp32")
    train, val = tiny_set(9, 0), tiny_set(3, 50)

    def fit(path, tracker, resume_from=None, stop=None):
        torch.manual_seed(config.seed)
        net = models.build_model(name, num_classes=3)
        checkpoints = CheckpointFile(tmp_path / path, meta={"name": name})
        result = engine.fit(config, net, train, val, ("r", "g", "b"), tracker, runtime,
                            checkpoints, resume_from, stop)  # fmt: skip
        return net, result

    twin_tracker = RecordingTracker()
    twin, _ = fit("twin.pt", twin_tracker)

    stop = StopRequests()
    first = StopAtStep(stop, stop_step)
    with pytest.raises(Interrupted) as stopped:
        fit("run.pt", first, stop=stop)
    assert stopped.value.checkpointed and stopped.value.exit_code == 130
    saved = checkpoint.load(tmp_path / "run.pt")
    assert saved["progress"]["global_step"] == stop_step
    assert saved["meta"] == {"name": name}

    second = RecordingTracker()
    resumed, result = fit("run.pt", second, resume_from=saved)

    assert result.global_step == 9
    for metric, points in twin_tracker.points.items():
        if metric not in TIMINGS:
            assert first.points.get(metric, []) + second.points[metric] == points, metric
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    last = checkpoint.load(tmp_path / "run.pt")["training"]["model"]
    for key, value in checkpoint.load(tmp_path / "twin.pt")["training"]["model"].items():
        torch.testing.assert_close(last[key], value, rtol=0, atol=0, msg=key)


def test_checkpoint_files_hold_only_tensors_and_plain_values(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save({"weights": torch.ones(2), "epoch": 3}, path)
    assert checkpoint.load(path)["epoch"] == 3
    assert not list(tmp_path.glob(".*partial"))  # written through a temporary file

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format": checkpoint.FORMAT, "payload": Payload()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint"):
        checkpoint.load(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=str(path)):
        checkpoint.load(path)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    checkpoint.save({"epoch": 1}, path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        checkpoint.save({"epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
