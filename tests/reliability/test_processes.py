"""Real training processes stopped by signals, crashing, and sharing one SQLite store.

Each test starts `cifar-experiments train` (or `mlflow run`) as a user would and checks what
MLflow holds afterwards: no run left RUNNING, no metric step lost or logged twice, and a
resumed run ending exactly where an uninterrupted twin ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import ROOT, cli_command, local_env, mlflow_run_command, write_image_folder

from cifar_experiments import checkpoint

pytestmark = pytest.mark.slow

EPOCHS = 5
# Small batches make each epoch last long enough (about a second) to be interrupted in.
OPTIONS = ["--epochs", str(EPOCHS), "--batch-size", "2", "--log-every", "1", "--seed", "3"]
TIMINGS = {"train/epoch_seconds", "train/images_per_second"}
LIMIT = 240  # seconds any one process may take


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reliability-data")
    return write_image_folder(folder, {"train": 100, "test": 10})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    """One SQLite store and decode cache for the module's processes, and their environment."""
    root = tmp_path_factory.mktemp("reliability-store")
    return local_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        CIFAR_EXPERIMENTS_CACHE=str(root / "cache"),
    )


def client(env: dict[str, str]) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])


def train(*args: str) -> list[str]:
    return cli_command("train", *args)


def start(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    # A session of its own, like a job in a terminal: a signal can reach its whole group.
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=LIMIT)
    return process.returncode, out, err


def run_named(env: dict[str, str], name: str) -> mlflow.entities.Run:
    runs = client(env).search_runs(
        [e.experiment_id for e in client(env).search_experiments()],
        filter_string=f"attributes.run_name = '{name}'",
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def wait_for_first_epoch(env: dict[str, str], name: str, process: subprocess.Popen) -> str:
    """The run's ID, once its first epoch's validation accuracy is in the store and its
    checkpoint is on disk (the metrics are flushed first, so they alone can come too early)."""
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            run = run_named(env, name)
            saved = Path(run.data.tags.get("checkpoint", "")).is_file()
            if saved and client(env).get_metric_history(run.info.run_id, "val/accuracy"):
                return run.info.run_id
        except (AssertionError, mlflow.exceptions.MlflowException):
            pass
        time.sleep(0.1)
    raise AssertionError(f"run {name} showed no epoch within {LIMIT} s")


def histories(env: dict[str, str], run_id: str) -> dict[str, list[tuple[int, float]]]:
    c = client(env)
    return {
        key: sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))
        for key in c.get_run(run_id).data.metrics
    }


def final_weights(
    env: dict[str, str], run: mlflow.entities.Run, folder: Path
) -> dict[str, torch.Tensor]:
    """A finished run's last training state, from its checkpoint artifact (a finished run
    removes its file)."""
    run_id = run.info.run_id
    saved = client(env).download_artifacts(run_id, f"checkpoint/{run_id}.pt", str(folder))
    return checkpoint.load(Path(saved))["training"]["model"]


@pytest.fixture(scope="module")
def twin(data_folder, store, tmp_path_factory) -> mlflow.entities.Run:
    """The uninterrupted training every resumed one must match."""
    cwd = tmp_path_factory.mktemp("twin")
    code, _, err = finish(start(train(*OPTIONS, "--data", str(data_folder), "--run-name", "twin",
                                    "--no-register"), store, cwd))  # fmt: skip
    assert code == 0, err[-3000:]
    return run_named(store, "twin")


def assert_same_as_twin(env: dict[str, str], run: mlflow.entities.Run, twin: mlflow.entities.Run):
    assert run.info.status == "FINISHED"
    ours, theirs = histories(env, run.info.run_id), histories(env, twin.info.run_id)
    for key, points in ours.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{key} has a step logged twice"
    # MLflow samples system metrics by the clock; every other curve is the twin's.
    ours, theirs = ({k: v for k, v in h.items() if not k.startswith("system/")}
                    for h in (ours, theirs))  # fmt: skip
    assert set(ours) == set(theirs)
    for key, points in ours.items():
        assert [s for s, _ in points] == [s for s, _ in theirs[key]], f"{key} has steps missing"
        if key not in TIMINGS:
            assert points == theirs[key], key
    steps_per_epoch = 270 // 2  # 300 images, 10 % held out, batches of 2
    assert [s for s, _ in ours["train/loss"]] == list(range(1, EPOCHS * steps_per_epoch + 1))
    with tempfile.TemporaryDirectory() as folder:
        mine = final_weights(env, run, Path(folder) / "resumed")
        reference = final_weights(env, twin, Path(folder) / "twin")
    for key, value in reference.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    ("launcher", "signum"),
    [("cli", signal.SIGINT), ("cli", signal.SIGTERM), ("mlflow run", signal.SIGINT)],
    ids=["cli-SIGINT", "cli-SIGTERM", "mlflow-run-SIGINT"],
)
def test_interrupted_run_is_killed_checkpointed_and_resumes_to_the_twins_result(
    data_folder, store, twin, tmp_path, launcher, signum
):
    name = f"{launcher}-{signum.name}".replace(" ", "-")
    if launcher == "cli":
        command = train(*OPTIONS, "--data", str(data_folder), "--run-name", name, "--no-register")
    else:
        same = {option: OPTIONS[OPTIONS.index("--" + option.replace("_", "-")) + 1]
                for option in ("epochs", "batch_size", "log_every", "seed")}  # fmt: skip
        command = mlflow_run_command(**same, data=data_folder, run_name=name, register="false")
    process = start(command, store, tmp_path)
    run_id = wait_for_first_epoch(store, name, process)
    if launcher == "cli":
        process.send_signal(signum)
    else:  # Ctrl-C in a terminal reaches `mlflow run` and the training it started
        os.killpg(process.pid, signum)
    code, _, err = finish(process)

    run = client(store).get_run(run_id)
    assert run.data.tags["error"] == f"interrupted by {signum.name}", err[-3000:]
    if launcher == "cli":
        assert run.info.status == "KILLED"
        assert code == 128 + signum
        resume = f"cifar-experiments train --resume {run_id}"
    else:
        # Our process marks the run KILLED, but `mlflow run` then marks any run whose process
        # exited non-zero FAILED: MLflow 3's `_maybe_set_run_terminated` compares the status
        # string with integer codes, so it never sees that the run already ended.
        assert run.info.status in ("KILLED", "FAILED")
        assert code != 0
        resume = f"mlflow run {ROOT} --run-id {run_id} -P resume={run_id} --env-manager local"
    assert f"Resume it with:\n  {resume}" in err
    saved = checkpoint.load(Path(run.data.tags["checkpoint"]))
    assert 0 < saved["training"]["progress"]["global_step"] < EPOCHS * 135
    logged = {f.path for f in client(store).list_artifacts(run_id, "checkpoint")}
    assert logged == {f"checkpoint/{run_id}.pt"}

    command = resume.split()
    command[0:1] = [sys.executable, "-m", "cifar_experiments" if launcher == "cli" else "mlflow"]
    code, _, err = finish(start(command, store, tmp_path))
    assert code == 0, err[-3000:]
    assert_same_as_twin(store, client(store).get_run(run_id), twin)


def test_a_crash_marks_the_run_failed_with_its_error_and_it_resumes(
    data_folder, store, twin, tmp_path
):
    # The process dies of an unexpected error after training, while plotting its curves.
    crash = (
        "import sys\n"
        "from cifar_experiments import cli, experiment\n"
        "def broken(history):\n"
        "    raise RuntimeError('the plotting library broke')\n"
        "experiment.curves_figure = broken\n"
        "sys.argv[0] = 'cifar-experiments'\n"
        "cli.main()\n"
    )
    command = [sys.executable, "-c", crash, "train", *OPTIONS, "--data", str(data_folder),
               "--run-name", "crash", "--no-register"]  # fmt: skip
    code, _, err = finish(start(command, store, tmp_path))
    assert code == 1
    run = run_named(store, "crash")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: the plotting library broke"

    code, _, err = finish(start(train("--resume", run.info.run_id), store, tmp_path))
    assert code == 0, err[-3000:]
    assert_same_as_twin(store, client(store).get_run(run.info.run_id), twin)


def test_after_kill_9_resume_takes_over_the_run_from_its_last_epoch(
    data_folder, store, twin, tmp_path
):
    # SIGKILL cannot be caught: the run stays RUNNING, and metrics logged after the last
    # checkpoint may or may not have reached the store. Resume sees the process is gone.
    name = "kill-9"
    process = start(train(*OPTIONS, "--data", str(data_folder), "--run-name", name,
                        "--no-register"), store, tmp_path)  # fmt: skip
    run_id = wait_for_first_epoch(store, name, process)
    process.kill()
    process.wait(timeout=LIMIT)
    assert client(store).get_run(run_id).info.status == "RUNNING"

    code, _, err = finish(start(train("--resume", run_id), store, tmp_path))
    assert code == 0, err[-3000:]
    assert_same_as_twin(store, client(store).get_run(run_id), twin)


LEARNING_RATES = ("0.01", "0.03", "0.1")
PARALLEL_EPOCHS, PARALLEL_STEPS_PER_EPOCH = 3, 270 // 8


def test_three_parallel_trainings_all_finish_with_every_metric_and_the_best_is_champion(
    data_folder, tmp_path
):
    env = local_env(
        # A store none of them has created yet: they race to create its tables too.
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        CIFAR_EXPERIMENTS_CACHE=str(tmp_path / "cache"),
    )
    processes = [
        start(train("--data", str(data_folder), "--epochs", str(PARALLEL_EPOCHS),
                    "--batch-size", "8", "--log-every", "1", "--lr", lr, "--run-name",
                    f"lr={lr}", "--experiment-name", "parallel"), env, tmp_path)
        for lr in LEARNING_RATES
    ]  # fmt: skip
    results = [p.communicate(timeout=LIMIT) for p in processes]
    for process, (_, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err[-3000:]

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(f"lr={lr}" for lr in LEARNING_RATES)
    for run in runs:
        assert run.info.status == "FINISHED"
        curves = histories(env, run.info.run_id)
        assert [s for s, _ in curves["train/loss"]] == list(
            range(1, PARALLEL_EPOCHS * PARALLEL_STEPS_PER_EPOCH + 1)
        )
        for name in ("val/accuracy", "train/epoch_loss"):
            assert [s for s, _ in curves[name]] == list(range(1, PARALLEL_EPOCHS + 1))

    versions = client.search_model_versions("name = 'cifar10-classifier'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
    best = max(runs, key=lambda r: (r.data.metrics["val/best_accuracy"], -r.info.start_time))
    champion = client.get_model_version_by_alias("cifar10-classifier", "champion")
    assert float(champion.tags["val_accuracy"]) == pytest.approx(
        best.data.metrics["val/best_accuracy"]
    )
