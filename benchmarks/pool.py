"""The tutorial Net's training step and forward pass with `speedups.MaxPool2x2`'s CPU path
against PyTorch's own max-pool, interleaved in one process (the machine's speed drifts).

    python benchmarks/pool.py [--rounds 6]

Random inputs: the time of these kernels does not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from cifar_experiments import engine, models

STEPS = 281  # one epoch of 36,000 images at batch 128


def workloads(fast_pool: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    """(a training epoch's steps, a forward pass over 4,000 images) on the CPU, in the
    precision training picks there."""
    torch.manual_seed(0)
    runtime = engine.Runtime.resolve("cpu")
    net = runtime.place(models.Net())
    net.pool.pairwise = fast_pool
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    images = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (128,))
    eval_images = torch.randn(1000, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def train() -> None:
        net.train()
        for _ in range(STEPS):
            with runtime.autocast():
                loss = torch.nn.functional.cross_entropy(net(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def forward() -> None:
        net.eval()
        for _ in range(4):
            with runtime.autocast():
                net(eval_images)

    return train, forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    variants = {"F.max_pool2d": workloads(False), "MaxPool2x2": workloads(True)}
    times: dict[str, dict[str, list[float]]] = {v: {"train": [], "forward": []} for v in variants}
    for train, forward in variants.values():  # warm-up: oneDNN builds its kernels on first use
        train()
        forward()
    for _ in range(args.rounds):
        for name, (train, forward) in variants.items():
            for kind, run in (("train", train), ("forward", forward)):
                started = time.perf_counter()
                run()
                times[name][kind].append(time.perf_counter() - started)
    for kind, what in (("train", f"{STEPS} training steps"), ("forward", "forward, 4,000 images")):
        ours, theirs = times["MaxPool2x2"][kind], times["F.max_pool2d"][kind]
        ratio = statistics.median(o / t for o, t in zip(ours, theirs, strict=True))
        print(f"{what}: F.max_pool2d {statistics.median(theirs):.3f} s, MaxPool2x2 "
              f"{statistics.median(ours):.3f} s, ratio {ratio:.2f} "
              f"(median of {args.rounds} rounds)")  # fmt: skip


if __name__ == "__main__":
    main()
