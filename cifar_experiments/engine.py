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
# Training images that data-dependent initialisation (airbench's whitening) looks at.
INIT_SAMPLE = 5000


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


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
        # Channels-last suits the convolution kernels of CUDA and of oneDNN on CPUs alike
        # (measured here: a fifth off the tutorial Net's CPU epoch).
        return model.to(memory_format=torch.channels_last)

    def put(self, images: data.ImageSet) -> data.ImageSet:
        """Keep a whole split resident on the device, as uint8, so batches never cross the bus."""
        return data.ImageSet(images.images.to(self.device), images.labels.to(self.device))


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
    best_epoch: int
    best_val: Evaluation  # the best epoch on the validation split, with test-time augmentation
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
    if isinstance(model, models.CifarNet):
        model.init_from_data(normalization(train_set.images[:INIT_SAMPLE]))
    # Weights are read and saved through `model`; `forward` may be its compiled twin.
    forward = torch.compile(model) if config.compile else model
    optimizer = make_optimizer(config, model)
    training = data.TrainingSet(train_set, config.augment)
    total_steps = config.epochs * training.steps(config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config.schedule, step, total_steps)
    )
    lookahead = Lookahead(model, total_steps) if config.lookahead else None
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    best_accuracy, best_epoch, best_state, global_step = -1.0, 0, {}, 0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        train_stats, global_step = train_one_epoch(
            config, forward, training, normalization, optimizer, scheduler, generator,
            tracker, runtime, epoch, global_step, lookahead,
        )  # fmt: skip
        # The curves follow the bare network; test-time augmentation waits for the best epoch.
        val = evaluate(forward, val_set, classes, normalization, runtime, tta=False)
        record = {
            **train_stats,
            **{f"val/{name}": value for name, value in val.metrics().items()},
            "train/epoch_seconds": time.perf_counter() - started,
        }
        tracker.log_metrics(record, step=epoch)
        history.append({"epoch": epoch, **record})
        if val.accuracy > best_accuracy:
            best_accuracy, best_epoch = val.accuracy, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        log.info(
            "epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  lr %.4g  %.1f s"
            "  (%.0f img/s)",
            epoch, config.epochs, record["train/epoch_loss"], 100 * record["train/accuracy"],
            val.loss, 100 * val.accuracy, record["train/lr"], record["train/epoch_seconds"],
            record["train/images_per_second"],
        )  # fmt: skip
    model.load_state_dict(best_state)
    best_val = evaluate(forward, val_set, classes, normalization, runtime)
    return FitResult(best_epoch, best_val, normalization, history, global_step)


def train_one_epoch(
    config: TrainConfig,
    model: nn.Module,
    train_set: data.TrainingSet,
    normalization: data.Normalization,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    tracker: MetricSink,
    runtime: Runtime,
    epoch: int,
    global_step: int,
    lookahead: Lookahead | None = None,
) -> tuple[dict[str, float], int]:
    model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    # Sums stay on the device: reading them every step would stall a GPU.
    loss_sum = torch.zeros((), device=runtime.device)
    window_loss = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), dtype=torch.int64, device=runtime.device)
    window = 0
    started = time.perf_counter()
    steps = train_set.steps(config.batch_size)
    progress = tqdm(
        total=steps, desc=f"epoch {epoch}/{config.epochs}", unit="step", leave=False, disable=None
    )
    for images, labels in train_set.batches(config.batch_size, generator):
        inputs = normalization(images)
        with runtime.autocast():
            logits = model(inputs)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        global_step += 1
        if lookahead is not None:
            lookahead.step(global_step)
        window += 1
        loss_sum += loss.detach() * len(labels)
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
    seen = steps * min(config.batch_size, len(train_set))
    return {
        "train/epoch_loss": loss_sum.item() / seen,
        "train/accuracy": correct.item() / seen,
        "train/lr": scheduler.get_last_lr()[0],
        "train/images_per_second": seen / seconds,
    }, global_step


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
