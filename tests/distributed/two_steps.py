"""What each process runs under torchrun in test_exactness: `helpers.two_steps`, then rank 0
saves the weights in the file its first argument names."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import two_steps

from cifar_experiments.distributed import World

world = World.from_environment()
world.join("cpu")
weights = two_steps(world)
if world.main:
    torch.save(weights, sys.argv[1])
world.leave(together=True)
