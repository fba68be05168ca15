"""The training loop: fit, train one epoch, evaluate. Device and precision are decided here only.

It reports numbers to anything with `log_metrics(metrics, step)` and `flush()`, and knows
nothing of MLflow.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from . import data, models
from .checkpoint import CheckpointFile
from .config import TrainConfig
from .evaluation import Evaluation
from .interrupts import Interrupted, StopRequests

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1000
# Training images that data-dependent initialisation (airbench's whitening) looks at.
INIT_SAMPLE = 5000


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None:
        """Make every metric logged so far durable."""


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

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.device.type == "cuda":
            # Batches keep one shape, so cuDNN's one-off search for the fastest kernels pays.
            torch.backends.cudnn.benchmark = True
        if self.device.type == "cpu":
            reuse_freed_memory()
        # Channels-last suits the convolution kernels of CUDA and of oneDNN on CPUs alike
        # (measured here: a fifth off the tutorial Net's CPU epoch).
        return model.to(memory_format=torch.channels_last)

    def put(self, images: data.ImageSet) -> data.ImageSet:
        """Keep a whole split resident on the device, as uint8, so batches never cross the bus."""
        return data.ImageSet(images.images.to(self.device), images.labels.to(self.device))


def reuse_freed_memory() -> None:
    """Have the C library (glibc; elsewhere nothing changes) keep freed memory for the next
    tensor, as CUDA's caching allocator does.

    By default glibc maps each large block fresh from the kernel and unmaps it when freed, so
    every training step faults in its activations again, page by page: airbench spent a
    sixth of its CPU step there (benchmarks/README.md). The memory stays with the process,
    which holds on to its peak use, as it would with a caching allocator.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc: macOS, Windows
        return
    m_trim_threshold, m_mmap_max = -1, -4
    # Serve large blocks from the heap, and never give its free top back.
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, -1)


def _cpu_has_native_bf16() -> bool:
    # Without these units bf16 is emulated and slower than fp32.
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


class Lookahead:
    """Every `every` steps, move a slow copy of the weights toward the live ones and restart
    the live ones from it (airbench). The pull grows with the cube of training progress, so
    early training runs free and the end averages over many steps."""

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5) -> None:
        # The module itself, not a compiled wrapper, whose state_dict names differ.
        self.model, self.total_steps, self.every = model, total_steps, every
        self.slow = {
            name: tensor.detach().clone()
            for name, tensor in model.state_dict().items()
            if tensor.is_floating_point()
        }

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        if global_step % self.every and global_step != self.total_steps:
            return
        keep = 0.95**self.every * (global_step / self.total_steps) ** 3
        live = self.model.state_dict()
        for name, slow in self.slow.items():
            slow.lerp_(live[name], 1 - keep)
            live[name].copy_(slow)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.SGD:
    """SGD, with batch-norm parameters at the model's own learning-rate scale."""
    scale = getattr(model, "norm_lr_scale", 1.0)
    norm_params = {
        id(p): p
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for p in module.parameters()
        if p.requires_grad
    }
    other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in norm_params]
    groups: list[dict] = [{"params": other_params}]
    if norm_params:
        groups.append(
            {
                "params": list(norm_params.values()),
                "lr": config.lr * scale,
                "weight_decay": config.weight_decay / scale,
            }
        )
    return torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )


@dataclass
class FitResult:
    kept_epoch: int
    kept_val: Evaluation  # the kept epoch on the validation split, with test-time augmentation
    normalization: data.Normalization
    history: list[dict[str, float]]
    global_step: int


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based) of `total_steps`."""
    progress = step / max(total_steps, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":  # linear warm-up over the first fifth, then linear decay to zero
        warmup = 0.2
        return progress / warmup if progress < warmup else (1 - progress) / (1 - warmup)
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass
class Progress:
    """How far training has got: `epoch` is the epoch under way and `step_in_epoch` the steps
    of it already taken (0 between epochs). With `Training.state_dict()`, a checkpoint."""

    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    # Running sums of the epoch under way; they stay on the device, as reading them every
    # step would stall a GPU.
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    kept_accuracy: float = -1.0
    kept_epoch: int = 0
    kept_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Training:
    """Everything an optimiser step changes. All the randomness of training (shuffling,
    crops, flips) comes from `generator`; `epoch_start` is its state, and the flips, as the
    epoch under way began, so an interrupted epoch can be replayed exactly."""

    model: nn.Module
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lookahead: Lookahead | None
    train_set: data.TrainingSet
    generator: torch.Generator
    epoch_start: dict[str, Any] = field(default_factory=dict)

    def begin_epoch(self) -> None:
        self.epoch_start = {
            "generator": self.generator.get_state(),
            "flipped": self.train_set.flipped,
        }

    def rewind_epoch(self) -> None:
        self.generator.set_state(self.epoch_start["generator"])
        flipped = self.epoch_start["flipped"]
        self.train_set.flipped = (
            flipped.to(self.train_set.labels.device) if flipped is not None else None
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "lookahead": self.lookahead.slow if self.lookahead is not None else None,
            "epoch_start": self.epoch_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.lookahead is not None:
            for name, slow in self.lookahead.slow.items():
                slow.copy_(state["lookahead"][name])
        self.epoch_start = state["epoch_start"]
        self.rewind_epoch()


def fit(
    config: TrainConfig,
    model: nn.Module,
    train_set: data.ImageSet,
    val_set: data.ImageSet,
    classes: tuple[str, ...],
    tracker: MetricSink,
    runtime: Runtime,
    checkpoints: CheckpointFile | None = None,
    resume_from: dict[str, Any] | None = None,
    stop: StopRequests | None = None,
) -> FitResult:
    """Train for `config.epochs`, validate after each, and leave `model` at the epoch that
    `config.keep_epoch` chooses: the best on validation, or the last.

    With `checkpoints`, the whole training state is saved after every epoch and when `stop`
    reports a signal (then `Interrupted` is raised); `resume_from` is such a saved state, and
    training goes on from it exactly as if it had never stopped.
    """
    normalization = data.Normalization.of(train_set.images)
    model = runtime.prepare_model(model)
    train_set, val_set = runtime.put(train_set), runtime.put(val_set)
    if isinstance(model, models.CifarNet):
        model.init_from_data(normalization(train_set.images[:INIT_SAMPLE]))
    # Weights are read and saved through `model`; `forward` may be its compiled twin.
    forward = torch.compile(model) if config.compile else model
    optimizer = make_optimizer(config, model)
    batches = data.TrainingSet(train_set, config.augment)
    total_steps = config.epochs * batches.steps(config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config.schedule, step, total_steps)
    )
    lookahead = Lookahead(model, total_steps) if config.lookahead else None
    generator = torch.Generator().manual_seed(config.seed)
    training = Training(model, optimizer, scheduler, lookahead, batches, generator)
    progress = Progress()
    if resume_from is None:
        training.begin_epoch()
    else:
        training.load_state_dict(resume_from["training"])
        progress = Progress(**resume_from["progress"])
        progress.sums = {k: v.to(runtime.device) for k, v in progress.sums.items()}
        log.info("Resuming at epoch %d, step %d", progress.epoch, progress.global_step)

    def save_checkpoint() -> None:
        if checkpoints is not None:
            tracker.flush()  # the curves on record must reach as far as the checkpoint
            checkpoints.save({"progress": progress.state_dict(), "training": training.state_dict()})

    with stop.deferred() if stop is not None else contextlib.nullcontext():
        while progress.epoch <= config.epochs:
            epoch = progress.epoch
            started = time.perf_counter()
            train_stats = train_one_epoch(config, forward, training, normalization, progress,
                                          tracker, runtime, stop)  # fmt: skip
            if train_stats is None:
                save_checkpoint()
                raise Interrupted(stop.pending, checkpointed=checkpoints is not None)
            # The curves follow the bare network; test-time augmentation waits for the kept epoch.
            val = evaluate(forward, val_set, classes, normalization, runtime, tta=False)
            record = {
                **train_stats,
                **{f"val/{name}": value for name, value in val.metrics().items()},
                "train/epoch_seconds": time.perf_counter() - started,
            }
            tracker.log_metrics(record, step=epoch)
            progress.history.append({"epoch": epoch, **record})
            if config.keep_epoch == "last" or val.accuracy > progress.kept_accuracy:
                progress.kept_accuracy, progress.kept_epoch = val.accuracy, epoch
                progress.kept_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                }
            log.info(
                "epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  lr %.4g"
                "  %.1f s  (%.0f img/s)",
                epoch, config.epochs, record["train/epoch_loss"], 100 * record["train/accuracy"],
                val.loss, 100 * val.accuracy, record["train/lr"], record["train/epoch_seconds"],
                record["train/images_per_second"],
            )  # fmt: skip
            progress.epoch, progress.step_in_epoch, progress.sums = epoch + 1, 0, {}
            training.begin_epoch()
            save_checkpoint()
            if stop is not None and stop.pending is not None:
                raise Interrupted(stop.pending, checkpointed=checkpoints is not None)
    model.load_state_dict(progress.kept_state)
    kept_val = evaluate(forward, val_set, classes, normalization, runtime)
    return FitResult(
        progress.kept_epoch, kept_val, normalization, progress.history, progress.global_step
    )


def train_one_epoch(
    config: TrainConfig,
    model: nn.Module,
    training: Training,
    normalization: data.Normalization,
    progress: Progress,
    tracker: MetricSink,
    runtime: Runtime,
    stop: StopRequests | None = None,
) -> dict[str, float] | None:
    """Train from `progress.step_in_epoch` to the end of the epoch, and return its statistics;
    or return None as soon as `stop` has a signal pending, with `progress` up to date."""
    model.train()
    if isinstance(training.model, models.CifarNet):
        training.model.begin_epoch(progress.epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    # `window_loss` sums the losses since the last point of the curve, or since the epoch began.
    sums = progress.sums or {
        name: torch.zeros((), dtype=dtype, device=runtime.device)
        for name, dtype in (("loss", torch.float32), ("window_loss", torch.float32),
                            ("correct", torch.int64))
    }  # fmt: skip
    progress.sums = sums
    started, first_step = time.perf_counter(), progress.step_in_epoch
    steps = training.train_set.steps(config.batch_size)
    progress_bar = tqdm(
        total=steps, initial=first_step, desc=f"epoch {progress.epoch}/{config.epochs}",
        unit="step", leave=False, disable=None,
    )  # fmt: skip
    batches = training.train_set.batches(config.batch_size, training.generator, first_step)
    for images, labels in batches:
        inputs = normalization(images)
        with runtime.autocast():
            logits = model(inputs)
            loss = loss_fn(logits.float(), labels)
        training.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        training.optimizer.step()
        training.scheduler.step()
        progress.global_step += 1
        progress.step_in_epoch += 1
        if training.lookahead is not None:
            training.lookahead.step(progress.global_step)
        sums["loss"] += loss.detach() * len(labels)
        sums["window_loss"] += loss.detach()
        sums["correct"] += (logits.argmax(dim=1) == labels).sum()
        if progress.global_step % config.log_every == 0:
            window = min(config.log_every, progress.step_in_epoch)
            mean_loss = sums["window_loss"].item() / window
            tracker.log_metrics({"train/loss": mean_loss}, step=progress.global_step)
            progress_bar.set_postfix(loss=f"{mean_loss:.3f}")
            sums["window_loss"].zero_()
        progress_bar.update()
        if stop is not None and stop.pending is not None and progress.step_in_epoch < steps:
            progress_bar.close()
            return None
    progress_bar.close()
    seconds = time.perf_counter() - started
    seen = steps * min(config.batch_size, len(training.train_set))
    return {
        "train/epoch_loss": sums["loss"].item() / seen,
        "train/accuracy": sums["correct"].item() / seen,
        "train/lr": training.scheduler.get_last_lr()[0],
        "train/images_per_second": (progress.step_in_epoch - first_step) * seen / steps / seconds,
    }


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
    predictions = []
    for batch, labels in data.batches(images, EVAL_BATCH_SIZE):
        with runtime.autocast():
            inputs = normalization(batch)
            log_proba = (
                models.predict_log_proba(model, inputs)
                if tta
                else model(inputs).float().log_softmax(dim=-1)
            )
        loss_sum += nn.functional.nll_loss(log_proba, labels, reduction="sum")
        predictions.append(log_proba.argmax(dim=1))
    return Evaluation(
        classes=classes,
        labels=images.labels.cpu().numpy(),
        predictions=torch.cat(predictions).cpu().numpy(),
        loss=loss_sum.item() / len(images),
    )
