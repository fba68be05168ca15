"""The training loop: fit, train one epoch, evaluate. Device and precision are decided here only.

It reports numbers to anything with `log_metrics(metrics, step)` and knows nothing of MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from . import data, models
from .config import TrainConfig
from .evaluation import Evaluation

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1000


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class DeviceUnavailable(ValueError):
    """The requested device is not present on this machine."""


@dataclass(frozen=True)
class Runtime:
    """Where tensors live, their memory layout, and in what precision the model runs."""

    device: torch.device

    @classmethod
    def resolve(cls, name: str) -> Runtime:
        available = {
            "cuda": torch.cuda.is_available(),
            "mps": torch.backends.mps.is_available(),
            "cpu": True,
        }
        if name == "auto":
            name = next(d for d in ("cuda", "mps", "cpu") if available[d])
        if not available.get(name, False):
            raise DeviceUnavailable(f"{name} is not available on this machine")
        return cls(torch.device(name))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 mixed precision on CUDA; full precision elsewhere."""
        if self.is_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        # Channels-last suits the convolution kernels of CUDA and of oneDNN on CPUs alike
        # (measured here: a fifth off the tutorial Net's CPU epoch).
        return model.to(memory_format=torch.channels_last)

    def prepare_batch(
        self, images: torch.Tensor, normalization: data.Normalization
    ) -> torch.Tensor:
        x = normalization(images)
        return x.contiguous(memory_format=torch.channels_last)

    def put(self, images: data.ImageSet) -> data.ImageSet:
        """Keep a whole split resident on the device, as uint8, so batches never cross the bus."""
        return data.ImageSet(images.images.to(self.device), images.labels.to(self.device))


@dataclass
class FitResult:
    best_epoch: int
    best_val: Evaluation
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


def fit(
    config: TrainConfig,
    model: nn.Module,
    train_set: data.ImageSet,
    val_set: data.ImageSet,
    classes: tuple[str, ...],
    tracker: MetricSink,
    runtime: Runtime,
) -> FitResult:
    """Train for `config.epochs`, validate after each, and leave `model` at its best epoch."""
    normalization = data.Normalization.of(train_set.images)
    model = runtime.prepare_model(model)
    train_set, val_set = runtime.put(train_set), runtime.put(val_set)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    total_steps = config.epochs * math.ceil(len(train_set) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config.schedule, step, total_steps)
    )
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    best_val: Evaluation | None = None
    best_epoch, best_state, global_step = 0, {}, 0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        train_stats, global_step = train_one_epoch(
            config, model, train_set, normalization, optimizer, scheduler, generator,
            tracker, runtime, epoch, global_step,
        )  # fmt: skip
        val = evaluate(model, val_set, classes, normalization, runtime)
        record = {
            **train_stats,
            **{f"val/{name}": value for name, value in val.metrics().items()},
            "train/epoch_seconds": time.perf_counter() - started,
        }
        tracker.log_metrics(record, step=epoch)
        history.append({"epoch": epoch, **record})
        if best_val is None or val.accuracy > best_val.accuracy:
            best_val, best_epoch = val, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        log.info(
            "epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  lr %.4g  %.1f s"
            "  (%.0f img/s)",
            epoch, config.epochs, record["train/epoch_loss"], 100 * record["train/accuracy"],
            val.loss, 100 * val.accuracy, record["train/lr"], record["train/epoch_seconds"],
            record["train/images_per_second"],
        )  # fmt: skip
    assert best_val is not None  # epochs >= 1 is validated in the config
    model.load_state_dict(best_state)
    return FitResult(best_epoch, best_val, normalization, history, global_step)


def train_one_epoch(
    config: TrainConfig,
    model: nn.Module,
    train_set: data.ImageSet,
    normalization: data.Normalization,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    tracker: MetricSink,
    runtime: Runtime,
    epoch: int,
    global_step: int,
) -> tuple[dict[str, float], int]:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    # Sums stay on the device: reading them every step would stall a GPU.
    loss_sum = torch.zeros((), device=runtime.device)
    window_loss = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), dtype=torch.int64, device=runtime.device)
    window = 0
    started = time.perf_counter()
    steps = math.ceil(len(train_set) / config.batch_size)
    progress = tqdm(
        total=steps, desc=f"epoch {epoch}/{config.epochs}", unit="step", leave=False, disable=None
    )
    for images, labels in data.batches(train_set, config.batch_size, generator):
        if config.augment:
            images = data.augment(images, generator)
        inputs = runtime.prepare_batch(images, normalization)
        with runtime.autocast():
            logits = model(inputs)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        global_step += 1
        window += 1
        batch_loss = loss.detach() * len(labels)
        loss_sum += batch_loss
        window_loss += loss.detach()
        correct += (logits.argmax(dim=1) == labels).sum()
        if window == config.log_every:
            mean_loss = window_loss.item() / window
            tracker.log_metrics({"train/loss": mean_loss}, step=global_step)
            progress.set_postfix(loss=f"{mean_loss:.3f}")
            window_loss.zero_()
            window = 0
        progress.update()
    progress.close()
    seconds = time.perf_counter() - started
    return {
        "train/epoch_loss": loss_sum.item() / len(train_set),
        "train/accuracy": correct.item() / len(train_set),
        "train/lr": scheduler.get_last_lr()[0],
        "train/images_per_second": len(train_set) / seconds,
    }, global_step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: data.ImageSet,
    classes: tuple[str, ...],
    normalization: data.Normalization,
    runtime: Runtime,
) -> Evaluation:
    model.eval()
    images = runtime.put(images)
    loss_sum = torch.zeros((), device=runtime.device)
    predictions = []
    for batch, labels in data.batches(images, EVAL_BATCH_SIZE):
        with runtime.autocast():
            log_proba = models.predict_log_proba(model, runtime.prepare_batch(batch, normalization))
        loss_sum += nn.functional.nll_loss(log_proba, labels, reduction="sum")
        predictions.append(log_proba.argmax(dim=1))
    return Evaluation(
        classes=classes,
        labels=images.labels.cpu().numpy(),
        predictions=torch.cat(predictions).cpu().numpy(),
        loss=loss_sum.item() / len(images),
    )
