"""What is refused before any process of a data-parallel training starts."""

import mlflow
import pytest
from click.testing import CliRunner
from helpers import TINY

from cifar_experiments import experiment
from cifar_experiments.cli import cli
from cifar_experiments.config import TrainConfig
from cifar_experiments.distributed import World, WorldError

UNSHARED = ("--batch-size 7 cannot be shared equally by 2 processes: give a multiple of 2, or "
            "fewer processes")  # fmt: skip


def test_a_batch_the_processes_cannot_share_is_refused_in_one_line_before_they_start(
    image_folder, monkeypatch
):
    started = []
    monkeypatch.setattr("cifar_experiments.distributed.launch", lambda *a: started.append(a))
    result = CliRunner().invoke(cli, ["train", "--data", str(image_folder), *TINY,
                                      "--batch-size", "7", "--nproc-per-node", "2"])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {UNSHARED}"]
    assert started == []
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_rank_0_refuses_it_too_under_torchrun_before_a_run_exists(image_folder):
    config = TrainConfig(data=str(image_folder), batch_size=7, precision="fp32")
    with pytest.raises(WorldError, match=UNSHARED):
        experiment.prepare(config, world=World(rank=0, size=2))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    experiment.prepare(config, world=World(rank=0, size=7))  # shared equally: no refusal
