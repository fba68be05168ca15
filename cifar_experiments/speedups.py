"""Speed tricks, each measured, each with its switch.

None changes what is computed, only how fast: the outputs and gradients are the same. Turn
any of them off by naming it in CIFAR_EXPERIMENTS_DISABLE (comma-separated; `all` for every
one), to rule a trick out or to time it (benchmarks/speed.py measures each on this machine).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

DISABLE_ENV = "CIFAR_EXPERIMENTS_DISABLE"
# What each does, and what it saved where it was first measured. speed.py times each on the
# machine at hand: on two AMD EPYCs (one with AVX-512, one with AVX2 only) none made training
# slower, and each paid on at least one of them (benchmarks/README.md).
SPEEDUPS = {
    "channels_last": "convolutions in channels-last memory, as oneDNN's CPU kernels and "
    "cuDNN prefer (a fifth off the tutorial Net's CPU epoch)",
    "pairwise_max_pool": "2x2 max-pooling of CPU tensors with few channels as two "
    "whole-tensor maxima (a tenth off the tutorial Net's CPU step)",
    "reuse_freed_memory": "glibc keeps freed memory for the next tensor instead of "
    "returning it to the kernel (a sixth off airbench's CPU step)",
    "cudnn_benchmark": "cuDNN times its kernels once for the fixed batch shape (CUDA)",
}


def enabled(name: str) -> bool:
    """Whether the speedup `name` is on: all are, unless CIFAR_EXPERIMENTS_DISABLE names it."""
    disabled = {word.strip() for word in os.environ.get(DISABLE_ENV, "").split(",")}
    return not disabled & {name, "all"}


def active(device: torch.device) -> list[str]:
    """The speedups that apply to `device` and are on, for the run's record."""
    for_device = {
        "cpu": ("channels_last", "pairwise_max_pool", "reuse_freed_memory"),
        "cuda": ("channels_last", "cudnn_benchmark"),
    }.get(device.type, ("channels_last",))
    unknown = {word.strip() for word in os.environ.get(DISABLE_ENV, "").split(",")}
    unknown -= {"", "all", *SPEEDUPS}
    if unknown:
        log.warning("%s names no speedup: %s (known: %s)", DISABLE_ENV,
                    ", ".join(sorted(unknown)), ", ".join(SPEEDUPS))  # fmt: skip
    return [name for name in for_device if enabled(name)]


def tune_process(device: torch.device) -> None:
    """The process-wide settings that make training on `device` faster."""
    if device.type == "cpu" and enabled("reuse_freed_memory"):
        _keep_freed_memory()
    if device.type == "cuda" and enabled("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True


def memory_format() -> torch.memory_format:
    """The layout of images and weights: channels-last, where convolutions run fastest."""
    return torch.channels_last if enabled("channels_last") else torch.contiguous_format


def _keep_freed_memory() -> None:
    """Have glibc (elsewhere nothing changes) keep freed memory for the next tensor, as CUDA's
    caching allocator does.

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


class MaxPool2x2(nn.Module):
    """`nn.MaxPool2d(2, 2)`, with a faster path for channels-last CPU tensors of few channels.

    PyTorch's CPU kernel vectorises across channels, so over the tutorial's first six it
    runs an element at a time: 1.1 ms of a 4 ms training step at batch 128. Taking the
    larger of each pair of columns, then of each pair of rows, as whole-tensor operations
    takes a tenth off the step and half off a forward pass (benchmarks/pool.py). The output
    and its gradient are identical.
    """

    # At 16 channels and more, PyTorch's kernel fills a vector register and is the faster.
    max_channels = 15

    def __init__(self) -> None:
        super().__init__()
        self.pairwise = enabled("pairwise_max_pool")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        if (
            x.device.type == "cpu"
            and c <= self.max_channels
            and h % 2 == 0
            and w % 2 == 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and self.pairwise
        ):
            return _PairwiseMaxPool.apply(x)
        return F.max_pool2d(x, 2)


class _PairwiseMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # Channels-last memory is (N, H, W, C): the two columns of a pair are neighbouring runs
        # of C values, and the two rows of a pair neighbouring runs of W*C.
        left, right = x.permute(0, 2, 3, 1).view(n, h, w // 2, 2, c).unbind(3)
        pairs = torch.maximum(left, right)
        top, bottom = pairs.view(n, h // 2, 2, -1).unbind(2)
        out = torch.maximum(top, bottom)
        if ctx.needs_input_grad[0]:
            # Which of each pair won, as 0 or 1 in x's dtype (so the backward multiplies
            # exactly). A tie goes to the left, then the top: PyTorch's own choice, so the
            # gradients match `F.max_pool2d`'s bit for bit.
            ctx.save_for_backward((right > left).to(x.dtype), (bottom > top).to(x.dtype))
        return out.view(n, h // 2, w // 2, c).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        from_right, from_bottom = ctx.saved_tensors
        n, h, half_w, c = from_right.shape
        grad = grad.permute(0, 2, 3, 1).reshape(n, h // 2, -1)
        to_bottom = grad * from_bottom
        grad_pairs = torch.stack((grad - to_bottom, to_bottom), dim=2).view(n, h, half_w, c)
        to_right = grad_pairs * from_right
        grad_x = torch.stack((grad_pairs - to_right, to_right), dim=3)
        return grad_x.view(n, h, 2 * half_w, c).permute(0, 3, 1, 2)
