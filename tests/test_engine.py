"""The training loop: curves with steps, the kept epoch, exact resumption, the recipe's parts."""

import re
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import RecordingTracker, tiny_set

from cifar_experiments import checkpoint, engine, models, optimization
from cifar_experiments.callbacks import Checkpointing
from cifar_experiments.checkpoint import CheckpointFile
from cifar_experiments.config import TrainConfig
from cifar_experiments.interrupts import Interrupted, StopRequests

CLASSES = ("r", "g", "b")
CPU = engine.Runtime.resolve("cpu")
CPUINFO = Path("/proc/cpuinfo")


def train(config: TrainConfig, train_per_class: int = 8, callbacks=(), runtime=CPU):
    """A fresh training of `config` on tiny data: its state and what `fit` returned."""
    state = engine.TrainingState.create(config, tiny_set(train_per_class, 0), CLASSES, runtime)
    return state, engine.fit(state, tiny_set(4, 50), callbacks)


class AtEachEpoch(engine.Callback):
    """Calls `see(state, epoch)` at every epoch's end."""

    def __init__(self, see):
        self.see = see

    def on_epoch_end(self, state, epoch, metrics):
        self.see(state, epoch)


def test_fit_logs_every_curve_with_steps_and_learns():
    config = TrainConfig(epochs=4, batch_size=8, lr=0.02, log_every=2, seed=1)
    tracker = RecordingTracker()
    _, result = train(config, train_per_class=16, callbacks=[tracker])
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
    state, result = train(TrainConfig(epochs=3, batch_size=8, seed=2))
    again = state.evaluate(tiny_set(4, 50))
    assert again.accuracy == result.kept_val.accuracy
    assert again.loss == pytest.approx(result.kept_val.loss, rel=1e-5)


@pytest.mark.parametrize(("keep_epoch", "kept"), [("best", 1), ("last", 3)])
def test_keep_epoch_chooses_whose_weights_the_model_ends_with(monkeypatch, keep_epoch, kept):
    config = TrainConfig(epochs=3, batch_size=8, seed=2, keep_epoch=keep_epoch)
    evaluate, epoch_curves = engine.evaluate, []

    def first_epoch_validates_best(model, images, classes, normalization, runtime, tta=True):
        result = evaluate(model, images, classes, normalization, runtime, tta)
        if not tta:  # a point of the validation curve: every epoch after the first scores 0
            epoch_curves.append(result)
            if len(epoch_curves) > 1:
                return replace(result, predictions=(result.labels + 1) % len(classes))
        return result

    weights_at = {}

    def keep_weights(state, epoch):
        weights_at[epoch] = {k: v.clone() for k, v in state.model.state_dict().items()}

    monkeypatch.setattr(engine, "evaluate", first_epoch_validates_best)
    state, result = train(config, callbacks=[AtEachEpoch(keep_weights)])
    assert result.kept_epoch == kept
    assert not torch.equal(weights_at[1]["fc3.weight"], weights_at[3]["fc3.weight"])
    for name, tensor in state.model.state_dict().items():
        assert torch.equal(tensor, weights_at[kept][name]), name


def test_an_epoch_end_callback_can_stop_training_there():
    class StopAfterSecondEpoch(engine.Callback):
        def on_epoch_end(self, state, epoch, metrics):
            return epoch == 2

    tracker = RecordingTracker()
    _, result = train(
        TrainConfig(epochs=5, batch_size=8), callbacks=[StopAfterSecondEpoch(), tracker]
    )
    assert [s for s, _ in tracker.points["val/accuracy"]] == [1, 2]  # every callback heard it
    assert len(result.history) == 2 and result.global_step == 2 * 3
    assert result.kept_epoch in (1, 2)


def test_same_seed_same_metrics_on_cpu():
    def run():
        tracker = RecordingTracker()
        train(TrainConfig(epochs=2, batch_size=8, log_every=1, seed=3), callbacks=[tracker])
        return tracker.points["train/loss"]

    assert run() == run()


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules_start_and_end_where_expected(schedule):
    factors = [optimization.lr_factor(schedule, s, 100) for s in range(101)]
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
    train(config, train_per_class=16, callbacks=[tracker])
    epoch_losses = [v for _, v in tracker.points["train/epoch_loss"]]
    assert epoch_losses[-1] < epoch_losses[0]


def test_airbench_whitening_bias_trains_for_its_first_epochs_only(monkeypatch):
    monkeypatch.setattr(models.Airbench, "whiten_bias_epochs", 1)
    # Without lookahead, which would go on averaging the frozen bias with its slow copy.
    config = TrainConfig(model="airbench", epochs=3, batch_size=16, lookahead=False, seed=0)
    biases = []
    see = AtEachEpoch(lambda state, epoch: biases.append(state.model.whiten.bias.detach().clone()))
    state, _ = train(config, train_per_class=16, callbacks=[see])
    assert biases[0].abs().sum() > 0  # it starts at zero and trained in epoch 1
    assert torch.equal(biases[1], biases[0]) and torch.equal(biases[2], biases[0])
    assert not state.model.whiten.bias.requires_grad


def test_lookahead_restarts_the_weights_from_their_slow_average():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    lookahead = optimization.Lookahead(net, total_steps=10, every=5)
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
    groups = optimization.make_optimizer(config, net).param_groups
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
    # The kernel's word for this CPU, not torch's: bf16 units are the flags avx512_bf16 (AMD
    # EPYC, Intel Cooper Lake on) and amx_bf16 (Intel Sapphire Rapids on).
    flags = set(re.search(r"^flags\s*:(.*)$", CPUINFO.read_text(), re.M).group(1).split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert engine.Runtime.resolve("cpu", "auto").bf16 is native


@pytest.mark.parametrize(
    ("units", "bf16"),
    [({"avx2": True}, False), ({"avx2": True, "avx512_bf16": True}, True),
     ({"amx_bf16": True}, True), ({"avx512": True, "avx512_bf16": False}, False)],
)  # fmt: skip
def test_auto_precision_follows_the_cpus_bf16_units(monkeypatch, units, bf16):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: units)
    assert engine.Runtime.resolve("cpu", "auto").bf16 is bf16


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
    train_set, val = tiny_set(9, 0), tiny_set(3, 50)

    def fit(path, tracker, resume_from=None, stop=None):
        state = engine.TrainingState.create(config, train_set, CLASSES, runtime)
        if resume_from is not None:
            state.load_state_dict(resume_from["training"])
        checkpoints = CheckpointFile(tmp_path / path, meta={"name": name})
        result = engine.fit(state, val, [tracker, Checkpointing(checkpoints, tracker, stop)])
        return state.model, result

    twin_tracker = RecordingTracker()
    twin, _ = fit("twin.pt", twin_tracker)

    stop = StopRequests()
    first = StopAtStep(stop, stop_step)
    with pytest.raises(Interrupted) as stopped:
        fit("run.pt", first, stop=stop)
    assert stopped.value.checkpointed and stopped.value.exit_code == 130
    saved = checkpoint.load(tmp_path / "run.pt")
    assert saved["training"]["progress"]["global_step"] == stop_step
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
