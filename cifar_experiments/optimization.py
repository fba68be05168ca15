"""How the weights move: SGD with its parameter groups, the learning-rate schedule, and
airbench's lookahead."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig
from .recipes import AIRBENCH94, ONE_CYCLE_WARMUP


class Lookahead:
    """Every `every` steps, move a slow copy of the weights toward the live ones and restart
    the live ones from it (airbench). The pull grows with a power of training progress (the
    cube), so early training runs free and the end averages over many steps."""

    def __init__(
        self, model: nn.Module, total_steps: int,
        every: int = AIRBENCH94.lookahead_every_n_steps,
    ) -> None:  # fmt: skip
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
        progress = global_step / self.total_steps
        decay, power = AIRBENCH94.lookahead_decay_base, AIRBENCH94.lookahead_decay_pow
        keep = decay**self.every * progress**power
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


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based) of `total_steps`."""
    progress = step / max(total_steps, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":  # linear warm-up, then linear decay to zero
        warmup = ONE_CYCLE_WARMUP
        return progress / warmup if progress < warmup else (1 - progress) / (1 - warmup)
    raise ValueError(f"unknown schedule {schedule!r}")
