"""A sweep against the same trainings run one after another, in one run on one machine.

    python benchmarks/sweep_vs_serial.py /tmp/cifar10-holdout   # train/<class>/*, test/<class>/*

Runs `mlflow run . -e sweep -P trials=6 -P epochs=3 -P workers=2` into a fresh store and
checks what it recorded: one parent run, its FINISHED child runs each tagged with its state,
searched values that differ, one registered version from the best trial, and that model's
accuracy on the folder's test images (through the registered model, as a user would load it).
Then trains each trial's settings with `mlflow run . -P epochs=3` one after another and
compares the wall times. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared toolbox
import mlflow
from helpers import local_env
from score_model import accuracy

from cifar_experiments.sweep import parent_run

ROOT = Path(__file__).resolve().parents[1]
# The sweep the issue measures: 6 trials of 3 epochs.
TRIALS, EPOCHS = 6, 3


def timed(command: list[str], env: dict[str, str], cwd: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="image folder with train/ and test/")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    folder = str(Path(args.folder).resolve())

    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(store)
        env = local_env(MLFLOW_TRACKING_URI=store)
        project = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local"]
        # The store's tables first, so neither timing includes making them.
        subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", store], env=env,
                       capture_output=True, check=True)  # fmt: skip

        sweep_seconds = timed(
            [*project, "-e", "sweep", "--experiment-name", "sweep", "-P", f"trials={TRIALS}",
             "-P", f"epochs={EPOCHS}", "-P", f"workers={args.workers}",
             "-P", f"data={folder}"],
            env, tmp,
        )  # fmt: skip
        print(f"sweep: {sweep_seconds:.1f} s", flush=True)

        runs = mlflow.search_runs(experiment_names=["sweep"], output_format="list")
        parents = [run for run in runs if parent_run.PARENT_TAG not in run.data.tags]
        trials = [run for run in runs if parent_run.PARENT_TAG in run.data.tags]
        states = sorted(run.data.tags[parent_run.STATE_TAG] for run in trials)
        statuses = sorted(run.info.status for run in trials)
        searched = [name.removeprefix("space.") for name in parents[0].data.params
                    if name.startswith("space.")]  # fmt: skip
        distinct = {name: len({run.data.params[name] for run in trials}) for name in searched}
        client = mlflow.MlflowClient()
        versions = client.search_model_versions("name = 'cifar10-classifier'")
        vals = {run.info.run_id: run.data.metrics.get("val/best_accuracy", -1) for run in trials}
        champion = client.get_model_version_by_alias("cifar10-classifier", "champion")
        correct, total, _ = accuracy(
            "models:/cifar10-classifier@champion", str(Path(folder) / "test")
        )
        print(f"parent runs: {len(parents)}; child runs: {len(trials)} ({', '.join(statuses)}); "
              f"states: {', '.join(states)}")  # fmt: skip
        print(f"distinct values per searched option over {len(trials)} trials: {distinct}")
        print(f"registered versions: {len(versions)}; champion's run is the best trial: "
              f"{champion.run_id == max(vals, key=vals.get)}")  # fmt: skip
        print(f"registered model on {total} held-out JPEGs: {correct / total:.2%}", flush=True)

        serial_seconds = 0.0
        for run in sorted(trials, key=lambda run: int(run.data.tags[parent_run.TRIAL_TAG])):
            values = [f"{name}={run.data.params[name]}" for name in searched]
            command = [*project, "--experiment-name", "serial", "-P", f"epochs={EPOCHS}",
                       "-P", f"data={folder}", "-P", "register=false"]  # fmt: skip
            for value in values:
                command += ["-P", value]
            serial_seconds += timed(command, env, tmp)
            print(f"  one after another, so far: {serial_seconds:.1f} s ({', '.join(values)})",
                  flush=True)  # fmt: skip
        print(f"sweep {sweep_seconds:.1f} s against {serial_seconds:.1f} s one after another: "
              f"{sweep_seconds / serial_seconds:.2f} of the time")  # fmt: skip


if __name__ == "__main__":
    main()
