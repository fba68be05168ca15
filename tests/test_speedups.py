"""Speed tricks change only speed: the same values and gradients, and each can be turned off."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_set

from cifar_experiments import data, engine, models, speedups
from cifar_experiments.config import TrainConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [3, 6, 16])
def test_max_pool_equals_pytorch_in_value_and_gradient(dtype, channels, monkeypatch):
    # Quarter steps make ties common, so the gradient must pick the winner PyTorch picks.
    x = (torch.randn(4, channels, 12, 10) * 4).round().div(4).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    fast_path = []
    apply = speedups._PairwiseMaxPool.apply
    monkeypatch.setattr(
        speedups._PairwiseMaxPool, "apply", lambda t: fast_path.append(1) or apply(t)
    )
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = speedups.MaxPool2x2()(ours)
    expected = torch.nn.functional.max_pool2d(theirs, 2)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)

    assert bool(fast_path) == (channels <= speedups.MaxPool2x2.max_channels)
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours.grad, theirs.grad)


def test_max_pool_falls_back_where_the_fast_path_does_not_apply():
    pool = speedups.MaxPool2x2()
    channels_last_odd = torch.randn(2, 6, 7, 9).to(memory_format=torch.channels_last)
    for x in (torch.randn(2, 6, 8, 8), channels_last_odd):
        assert torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 2))


def test_each_speedup_has_a_switch(monkeypatch):
    assert all(speedups.enabled(name) for name in speedups.SPEEDUPS)
    cpu = torch.device("cpu")
    assert speedups.active(cpu) == ["channels_last", "pairwise_max_pool", "reuse_freed_memory"]
    monkeypatch.setenv(speedups.DISABLE_ENV, "pairwise_max_pool, channels_last")
    assert speedups.active(cpu) == ["reuse_freed_memory"]
    assert not speedups.MaxPool2x2().pairwise
    assert speedups.memory_format() == torch.contiguous_format
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert data.Normalization((0.5,) * 3, (0.2,) * 3)(images).is_contiguous()
    monkeypatch.setenv(speedups.DISABLE_ENV, "all")
    assert speedups.active(cpu) == [] and speedups.active(torch.device("cuda")) == []


def test_training_without_the_speedups_learns_the_same(monkeypatch):
    config = TrainConfig(epochs=2, batch_size=8, log_every=1, seed=5, precision="fp32")
    runtime = engine.Runtime.resolve("cpu", "fp32")

    def trained_weights():
        state = engine.TrainingState.create(config, tiny_set(8, 0), ("r", "g", "b"), runtime)
        engine.fit(state, tiny_set(2, 9))
        return state.model.state_dict()

    fast = trained_weights()
    monkeypatch.setenv(speedups.DISABLE_ENV, "all")
    plain = trained_weights()
    for name, value in fast.items():
        # channels-last convolutions add up in another order: equal to float rounding
        torch.testing.assert_close(plain[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_the_tutorial_net_pools_with_the_fast_path():
    assert isinstance(models.build_model("tutorial").pool, speedups.MaxPool2x2)


FAULTS_OF_LARGE_TENSORS = """
import resource, torch
from cifar_experiments import speedups

def faults_of_five_large_tensors():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 2**20)  # 64 MiB, written through, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_five_large_tensors()
default = faults_of_five_large_tensors()
speedups.tune_process(torch.device("cpu"))
# The heap takes a round or two to settle around the blocks (seen here on an AMD EPYC).
print(default, min(faults_of_five_large_tensors() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("disabled", ["", "reuse_freed_memory"])
def test_cpu_training_reuses_freed_memory_instead_of_faulting_it_in_again(disabled):
    env = {**os.environ, speedups.DISABLE_ENV: disabled}
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_LARGE_TENSORS], capture_output=True,
                         text=True, check=True, env=env).stdout  # fmt: skip
    default, after = map(int, out.split())
    if default < 5 * 1000:
        pytest.skip(f"this kernel maps large blocks in few faults ({default})")
    if disabled:
        assert after > default / 2
    else:
        assert after < default / 20
