"""One training in several processes under torchrun, on loopback with gloo, a thread each: one
MLflow run recorded by rank 0 (here from two machines), a killed rank restarted, a stop
resumed."""

import os
import signal
import subprocess
from pathlib import Path

import mlflow
import pytest
from helpers import (
    TINY,
    TORCHRUN_ENV,
    cli_command,
    free_port,
    local_env,
    rank_process,
    steps_logged,
    torchrun_command,
    wait_until,
    write_image_folder,
)

pytestmark = pytest.mark.slow  # processes of their own
# Long enough an epoch (405 steps of 2 images) to kill a process in the middle of the second.
SLOW = ["--epochs", "3", "--batch-size", "2", "--log-every", "10", "--precision", "fp32",
        "--register", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("slow"), {"train": 300, "test": 4})


def only_run() -> mlflow.entities.Run:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1, [run.info.run_name for run in runs]
    return runs[0]


def assert_each_step_once(run: mlflow.entities.Run, epochs: int, log_every: int) -> None:
    steps = steps_logged(run)
    assert steps["val/accuracy"] == steps["train/epoch_loss"] == list(range(1, epochs + 1))
    loss_steps = sorted(steps["train/loss"])
    assert loss_steps == list(range(log_every, log_every * len(loss_steps) + 1, log_every))
    assert {key: s for key, s in steps.items() if len(set(s)) != len(s)} == {}


def test_a_killed_rank_is_restarted_and_the_same_run_finishes(slow_folder, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    launcher = subprocess.Popen(
        torchrun_command("-m", "cifar_experiments", "train", "--data", str(slow_folder), *SLOW,
                         "--checkpoint-dir", str(checkpoints),
                         launch=("--standalone", "--max-restarts", "1")),
        env=local_env(**TORCHRUN_ENV), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    wait_until(lambda: any(checkpoints.glob("*.pt")), "the first epoch's checkpoint", launcher)
    rank_1 = rank_process(launcher.pid, 1)
    assert rank_1 is not None
    rank_1.send_signal(signal.SIGKILL)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output
    assert "Resuming at epoch 2" in output
    run = only_run()
    assert run.info.status == "FINISHED"
    assert "error" not in run.data.tags  # the failed attempt's reason went with the restart
    assert_each_step_once(run, epochs=3, log_every=10)


def test_ctrl_c_stops_every_process_and_one_process_resumes_the_run(slow_folder, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    launcher = subprocess.Popen(
        cli_command("train", "--data", str(slow_folder), *SLOW, "--checkpoint-dir",
                    str(checkpoints), "--nproc-per-node", "2"),
        env=local_env(**TORCHRUN_ENV), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,  # a terminal's Ctrl-C reaches its whole group
    )  # fmt: skip
    wait_until(lambda: any(checkpoints.glob("*.pt")), "the first epoch's checkpoint", launcher)
    os.killpg(launcher.pid, signal.SIGINT)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, output
    run = only_run()
    assert run.info.status == "KILLED"
    assert f"--resume {run.info.run_id}" in output
    # Rank 0 speaks for the training; torchrun's own report of the stop is left out.
    assert output.count("SIGINT received") == 1 and "Traceback" not in output
    # Another number of processes: the batches do not depend on it.
    resumed = subprocess.run(
        cli_command("train", "--resume", run.info.run_id, "--checkpoint-dir", str(checkpoints)),
        env=local_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    run = only_run()
    assert run.info.status == "FINISHED"
    assert_each_step_once(run, epochs=3, log_every=10)


def test_two_machines_on_loopback_train_one_run_with_system_metrics_of_each(image_folder, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    env = local_env(**TORCHRUN_ENV, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2")

    def agent(node: int) -> subprocess.Popen:
        launch = ("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                  "--rdzv-id", "pair")  # fmt: skip
        command = torchrun_command(
            "-m", "cifar_experiments", "train", "--data", str(image_folder), *TINY,
            "--checkpoint-dir", str(tmp_path / f"node{node}"), launch=launch, nproc=1,
        )  # fmt: skip
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    agents = [agent(0), agent(1)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    run = only_run()
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["world_size"], params["batch_size"], params["batch_size_per_process"]) == (
        "2", "8", "4",
    )  # fmt: skip
    assert_each_step_once(run, epochs=2, log_every=1)
    assert sum(f"Run {run.info.run_id} finished" in output for output in outputs) == 1
    # A finished run's checkpoint is gone, from whichever machine rank 0 ran on.
    assert [file for folder in tmp_path.iterdir() for file in folder.iterdir()] == []
    nodes = {key.split("/")[1] for key in run.data.metrics if key.startswith("system/")}
    assert nodes == {"node_0", "node_1"}
