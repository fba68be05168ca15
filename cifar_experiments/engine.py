"""The training loop: `fit` trains a `TrainingState` and calls its callbacks at named
moments; `evaluate` scores a split. Device and precision are decided here only.

It knows nothing of MLflow: tracking, the progress bar, checkpoints and a sweep's pruner
plug in as a `Callback` at its named moments (callbacks.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
from torch import nn

from . import data, models, speedups
from .config import TrainConfig
from .distributed import World
from .evaluation import Evaluation
from .optimization import Lookahead, lr_factor, make_optimizer

log = logging.getLogger(__name__)
Model = TypeVar("Model", bound=nn.Module)

EVAL_BATCH_SIZE = 1000
# Training images that data-dependent initialisation (airbench's whitening) looks at.
INIT_SAMPLE = 5000


class DeviceUnavailable(ValueError):
    """The requested device is not present on this machine."""


@dataclass(frozen=True)
class Runtime:
    """Where tensors live, their memory layout, and in what precision the model runs."""

    device: torch.device
    bf16: bool = False

    @classmethod
    def resolve(cls, name: str, precision: str = "auto") -> Runtime:
        available = {
            "cuda": torch.cuda.is_available(),
            "mps": torch.backends.mps.is_available(),
            "cpu": True,
        }
        if name == "auto":
            name = next(d for d in ("cuda", "mps", "cpu") if available[d])
        if not available.get(name, False):
            raise DeviceUnavailable(f"{name} is not available on this machine")
        if precision == "auto":
            bf16 = name == "cuda" or (name == "cpu" and _cpu_has_native_bf16())
        else:
            bf16 = precision == "bf16"
        return cls(torch.device(name), bf16)

    @property
    def precision(self) -> str:
        return "bf16 autocast" if self.bf16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def place(self, model: Model) -> Model:
        """`model` on this device, in the memory layout its convolutions run fastest in."""
        # Module.to takes a device and a memory format together; torch's overloads list each
        # alone.
        return model.to(self.device, memory_format=speedups.memory_format())  # type: ignore[call-overload]

    def put(self, images: data.ImageSet) -> data.ImageSet:
        """Keep a whole split resident on the device, as uint8, so batches never cross the bus."""
        return data.ImageSet(images.images.to(self.device), images.labels.to(self.device))


def _cpu_has_native_bf16() -> bool:
    # Without these units bf16 is emulated and slower than fp32.
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


@dataclass
class EpochSums:
    """Running sums over the epoch under way. They stay on the device: reading them every
    step would stall a GPU. `window_loss` sums the losses since the last point of the
    training-loss curve, or since the epoch began."""

    loss: torch.Tensor
    window_loss: torch.Tensor
    correct: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> EpochSums:
        zero = torch.zeros((), device=device)
        return cls(zero.clone(), zero.clone(), torch.zeros((), dtype=torch.int64, device=device))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss * len(labels)
        self.window_loss += loss
        self.correct += (logits.argmax(dim=1) == labels).sum()

    def summed_over(self, world: World) -> None:
        """Every rank's sums, added up, on every rank."""
        for total in (self.loss, self.window_loss, self.correct):
            world.summed(total)


# The fields of TrainingState that say how far training has got and what it has kept.
PROGRESS = ("epoch", "step_in_epoch", "global_step", "kept_epoch", "kept_accuracy",
            "kept_weights", "history")  # fmt: skip


@dataclass
class TrainingState:
    """Everything training reads and changes, in one place: `state_dict()` is the checkpoint
    and `load_state_dict()` resumes from one, exactly.

    `epoch` is the epoch under way (1-based) and `step_in_epoch` the steps of it already
    taken. All the randomness of training (shuffling, crops, flips) comes from `generator`;
    `epoch_start` holds it, and the flips, as the epoch under way began, so an interrupted
    epoch can be replayed.

    Under torchrun every rank holds the same state but for `sums` (its own images') and
    `step_forward`, which averages the gradients of all; only rank 0 validates and keeps
    weights (through `forward`: the bare network's passes ask nothing of the other ranks).
    """

    config: TrainConfig
    runtime: Runtime
    classes: tuple[str, ...]
    model: models.CifarNet  # weights are read and saved through it
    forward: nn.Module  # `model`, or its compiled twin: what evaluates
    step_forward: nn.Module  # `forward`, under torchrun wrapped to average the gradients
    normalization: data.Normalization
    batches: data.TrainingSet
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lookahead: Lookahead | None
    generator: torch.Generator
    sums: EpochSums
    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    kept_epoch: int = 0
    kept_accuracy: float = -1.0
    kept_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_start: dict[str, Any] = field(default_factory=dict)
    last_val: Evaluation | None = None  # the last epoch's validation, for callbacks to show
    world: World = field(default_factory=World)

    @classmethod
    def create(
        cls, config: TrainConfig, train_set: data.ImageSet, classes: tuple[str, ...],
        runtime: Runtime, world: World | None = None,
    ) -> TrainingState:  # fmt: skip
        """A fresh training of `config.model` on `train_set`, seeded by `config.seed`, by the
        processes of `world` together (by default, this one alone)."""
        world = world or World()
        speedups.tune_process(runtime.device)
        torch.manual_seed(config.seed)
        model = runtime.place(models.build_model(config.model, num_classes=len(classes)))
        normalization = data.Normalization.of(train_set.images)
        train_set = runtime.put(train_set)
        model.init_from_data(normalization(train_set.images[:INIT_SAMPLE]))
        batches = data.TrainingSet(train_set, config.augment)
        optimizer = make_optimizer(config, model)
        total_steps = config.epochs * batches.steps(config.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(config.schedule, step, total_steps)
        )
        forward = cast(nn.Module, torch.compile(model)) if config.compile else model
        state = cls(
            config, runtime, classes, model,
            # A compiled Module is a Module (OptimizedModule); the stub says only "callable".
            forward=forward, step_forward=world.wrap(forward),
            normalization=normalization, batches=batches, optimizer=optimizer,
            scheduler=scheduler,
            lookahead=Lookahead(model, total_steps) if config.lookahead else None,
            generator=torch.Generator().manual_seed(config.seed),
            sums=EpochSums.zeros(runtime.device), world=world,
        )  # fmt: skip
        state.epoch_start = state._random_streams()
        return state

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps(self.config.batch_size)

    def loss_point(self) -> dict[str, float]:
        """The training-loss curve's point at this step, every `log_every` steps; else nothing."""
        if self.global_step % self.config.log_every:
            return {}
        window = min(self.config.log_every, self.step_in_epoch) * self.world.size
        total = self.world.summed(self.sums.window_loss).item()
        self.sums.window_loss.zero_()
        return {"train/loss": total / window}

    def epoch_metrics(self, first_step: int, seconds: float) -> dict[str, float]:
        """The training statistics of the epoch under way, now that its last step is taken."""
        self.sums.summed_over(self.world)
        seen = self.steps_per_epoch * min(self.config.batch_size, len(self.batches))
        taken = (self.step_in_epoch - first_step) * seen / self.steps_per_epoch
        return {
            "train/epoch_loss": self.sums.loss.item() / seen,
            "train/accuracy": self.sums.correct.item() / seen,
            "train/lr": float(self.scheduler.get_last_lr()[0]),
            "train/images_per_second": taken / seconds,
        }

    def end_epoch(self, metrics: dict[str, float], val: Evaluation | None) -> None:
        """Record the epoch just trained and its validation (rank 0's alone), keep its weights
        if `keep_epoch` says so, and move on to the next."""
        self.history.append({"epoch": self.epoch, **metrics})
        self.last_val = val
        if val is not None and (
            self.config.keep_epoch == "last" or val.accuracy > self.kept_accuracy
        ):
            self.kept_accuracy, self.kept_epoch = val.accuracy, self.epoch
            self.kept_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.sums = EpochSums.zeros(self.runtime.device)
        self.epoch_start = self._random_streams()

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "lookahead": self.lookahead.slow if self.lookahead is not None else None,
            "epoch_start": self.epoch_start,
            "sums": vars(self.sums),
            "progress": {name: getattr(self, name) for name in PROGRESS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.lookahead is not None:
            for name, slow in self.lookahead.slow.items():
                slow.copy_(state["lookahead"][name])
        self.sums = EpochSums(**{k: v.to(self.runtime.device) for k, v in state["sums"].items()})
        if not self.world.main:  # the saved sums are every rank's, added up on rank 0
            self.sums = EpochSums.zeros(self.runtime.device)
        for name, value in state["progress"].items():
            setattr(self, name, value)
        # Back to the epoch's start: its first `step_in_epoch` batches are drawn again, unused.
        self.epoch_start = state["epoch_start"]
        self.generator.set_state(self.epoch_start["generator"])
        flipped = self.epoch_start["flipped"]
        self.batches.flipped = flipped.to(self.runtime.device) if flipped is not None else None

    def evaluate(self, images: data.ImageSet, tta: bool = True) -> Evaluation:
        """The model as it stands on `images`; with `tta`, as the logged model predicts."""
        return evaluate(self.forward, images, self.classes, self.normalization, self.runtime, tta)

    def _random_streams(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "flipped": self.batches.flipped}


class Callback:
    """The moments of `fit` at which the rest plugs in (callbacks.py). Each does nothing
    unless a subclass says otherwise."""

    def on_train_start(self, state: TrainingState) -> None:
        """Before the first step, of a fresh training or a resumed one."""

    def on_step_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        """After each optimiser step. `metrics` holds the training-loss curve's point
        (`train/loss`, step = `state.global_step`) every `log_every` steps, else nothing."""

    def on_epoch_end(
        self, state: TrainingState, epoch: int, metrics: dict[str, float]
    ) -> bool | None:
        """After epoch `epoch` and its validation; `state` has moved on to the next epoch.
        Answer True to make it the last (a pruner does)."""

    def on_train_end(self, state: TrainingState) -> None:
        """After the last epoch, with the kept epoch's weights back in the model."""


@dataclass
class FitResult:
    kept_epoch: int
    kept_val: Evaluation  # the kept epoch on the validation split, with test-time augmentation
    history: list[dict[str, float]]
    global_step: int


def fit(
    state: TrainingState, val_set: data.ImageSet, callbacks: Sequence[Callback] = ()
) -> FitResult | None:
    """Train from where `state` stands to its last epoch, validate after each epoch, and leave
    the model with the weights of the epoch `keep_epoch` chooses: the best on validation, or
    the last. Callbacks are called at four moments (callbacks.Callback); when one answers an
    epoch's end with True, that epoch is the last. Under torchrun every rank trains, and the
    ranks other than 0, which neither validate nor keep weights, answer None after the last
    epoch.
    """
    config, runtime = state.config, state.runtime
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    val_set = runtime.put(val_set)  # once, not every epoch
    for callback in callbacks:
        callback.on_train_start(state)
    stop_early = False
    while state.epoch <= config.epochs and not stop_early:
        started, first_step = time.perf_counter(), state.step_in_epoch
        state.step_forward.train()
        state.model.begin_epoch(state.epoch)
        part = (state.world.rank, state.world.size)
        for images, labels in state.batches.batches(
            config.batch_size, state.generator, first_step, part
        ):
            with runtime.autocast():
                logits = state.step_forward(state.normalization(images))
                loss = loss_fn(logits.float(), labels)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            state.scheduler.step()
            state.global_step += 1
            state.step_in_epoch += 1
            if state.lookahead is not None:
                state.lookahead.step(state.global_step)
            state.sums.add(loss.detach(), logits.detach(), labels)
            point = state.loss_point()
            for callback in callbacks:
                callback.on_step_end(state, point)
        metrics = state.epoch_metrics(first_step, time.perf_counter() - started)
        # The curves follow the bare network; test-time augmentation waits for the kept epoch.
        # Rank 0 validates alone: the others' weights are the same.
        val = state.evaluate(val_set, tta=False) if state.world.main else None
        if val is not None:
            metrics.update({f"val/{name}": value for name, value in val.metrics().items()})
        metrics["train/epoch_seconds"] = time.perf_counter() - started
        epoch = state.epoch
        state.end_epoch(metrics, val)
        # Every callback hears of the epoch, whichever asks to stop.
        stop_early = any([callback.on_epoch_end(state, epoch, metrics) for callback in callbacks])
    if not state.world.main:  # the other ranks' part is done
        return None
    state.model.load_state_dict(state.kept_weights)
    kept_val = state.evaluate(val_set)
    for callback in callbacks:
        callback.on_train_end(state)
    return FitResult(state.kept_epoch, kept_val, state.history, state.global_step)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: data.ImageSet,
    classes: tuple[str, ...],
    normalization: data.Normalization,
    runtime: Runtime,
    tta: bool = True,
) -> Evaluation:
    """Accuracy, loss and predictions; with `tta`, as the logged model predicts."""
    model.eval()
    images = runtime.put(images)
    loss_sum = torch.zeros((), device=runtime.device)
    predictions, scores, true_scores = [], [], []
    for batch, labels in data.batches(images, EVAL_BATCH_SIZE):
        with runtime.autocast():
            inputs = normalization(batch)
            log_proba = (
                models.predict_log_proba(model, inputs)
                if tta
                else model(inputs).float().log_softmax(dim=-1)
            )
        loss_sum += nn.functional.nll_loss(log_proba, labels, reduction="sum")
        top = log_proba.max(dim=1)
        predictions.append(top.indices)
        scores.append(top.values.exp())
        true_scores.append(log_proba.gather(1, labels[:, None]).squeeze(1).exp())
    return Evaluation(
        classes=classes,
        labels=images.labels.cpu().numpy(),
        predictions=torch.cat(predictions).cpu().numpy(),
        scores=torch.cat(scores).cpu().numpy(),
        loss=loss_sum.item() / len(images),
        true_scores=torch.cat(true_scores).cpu().numpy(),
    )
