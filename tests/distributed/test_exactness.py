"""Data-parallel training takes the very steps one process takes on the whole batch."""

import subprocess

import pytest
import torch
from helpers import ROOT, TORCHRUN_ENV, local_env, torchrun_command, two_steps

from cifar_experiments.distributed import World

pytestmark = pytest.mark.slow  # processes of their own
SCRIPT = ROOT / "tests" / "distributed" / "two_steps.py"


def test_two_ranks_take_the_steps_one_process_takes_on_the_whole_batch(tmp_path):
    subprocess.run(torchrun_command(str(SCRIPT), str(tmp_path / "ranks.pt")),
                   env=local_env(**TORCHRUN_ENV), check=True, timeout=120)  # fmt: skip
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    alone = two_steps(World())
    for name, weight in alone.items():
        # Each rank took 6 of the 12 images of each batch, and DDP averaged their gradients.
        torch.testing.assert_close(ranks[name], weight, atol=1e-6, rtol=0)
    # A step moves the weights by far more than that.
    one_step = two_steps(World(), steps=1)
    assert max((one_step[n] - alone[n]).abs().max().item() for n in alone) > 1e-3
