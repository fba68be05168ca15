"""Nothing lost, on real data: the end-to-end check of interruption, resume and parallel runs.

    python benchmarks/interrupt_resume.py /path/to/image-folder [--epochs 10] [--kill-in 5]

In a fresh SQLite store, with `mlflow run` as a user types it: (1) an uninterrupted twin;
(2) the same run stopped by Ctrl-C (SIGINT to its process group) during epoch `--kill-in`,
then resumed with `mlflow run . --run-id ID -P resume=ID`, and compared with the twin curve
by curve, weight by weight and by its registered version; (3) three runs at once with
different learning rates, which must all finish with complete curves, `champion` ending on
the best. Prints what it counted. Not part of the test suite (minutes, real data).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared toolbox
import mlflow
import torch
from helpers import local_env

from cifar_experiments import checkpoint
from cifar_experiments.tracking import project_run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--kill-in", type=int, default=5, help="epoch during which to stop")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="interrupt-resume-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = local_env(MLFLOW_TRACKING_URI=uri)
    env.pop(project_run.ENV, None)  # each `mlflow run` below makes its own run
    subprocess.run(["mlflow", "db", "upgrade", uri], env=env, check=True, capture_output=True)
    client = mlflow.MlflowClient(uri)

    def project(*params: str, extra: tuple[str, ...] = ()) -> list[str]:
        command = ["mlflow", "run", str(ROOT), "--env-manager", "local", *extra]
        for param in (f"data={args.folder}", f"epochs={args.epochs}", *params):
            command += ["-P", param]
        return command

    def run_named(name: str) -> mlflow.entities.Run:
        (run,) = client.search_runs(["0"], filter_string=f"attributes.run_name = '{name}'")
        return run

    print(f"store {uri}")
    subprocess.run(project("run_name=twin"), env=env, cwd=work, check=True, capture_output=True)
    twin = run_named("twin")

    process = subprocess.Popen(project("run_name=interrupted"), env=env, cwd=work,
                               start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    run_id = None
    while process.poll() is None:
        try:
            run_id = run_named("interrupted").info.run_id
            if len(client.get_metric_history(run_id, "val/accuracy")) >= args.kill_in - 1:
                break
        except ValueError:  # no such run yet
            pass
        time.sleep(0.2)
    time.sleep(1.0)  # well into the epoch
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate()
    stopped = client.get_run(run_id)
    saved = checkpoint.load(Path(stopped.data.tags["checkpoint"]))["progress"]
    print(f"interrupted: status {stopped.info.status}, tag error={stopped.data.tags['error']!r},"
          f" checkpoint at epoch {saved['epoch']} step {saved['global_step']}")  # fmt: skip
    lines = err.splitlines()
    advice = next(i for i, line in enumerate(lines) if "Resume it with:" in line)
    print("  it printed: " + " ".join(line.strip() for line in lines[advice : advice + 2]))

    resume = ["mlflow", "run", str(ROOT), "--env-manager", "local", "--run-id", run_id,
              "-P", f"resume={run_id}"]  # fmt: skip
    subprocess.run(resume, env=env, cwd=work, check=True, capture_output=True)
    resumed = client.get_run(run_id)
    print(f"resumed: status {resumed.info.status}")
    compare(client, resumed, twin)

    rates = ("0.03", "0.05", "0.1")  # 0.07 is the recipe's: the twin's result again
    started = [
        subprocess.Popen(project(f"lr={lr}", f"run_name=parallel-{lr}"), env=env, cwd=work,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for lr in rates
    ]  # fmt: skip
    codes = [p.wait() for p in started]
    parallel = [run_named(f"parallel-{lr}") for lr in rates]
    complete = [steps_complete(client, r) for r in parallel]
    registered = client.search_model_versions("name = 'cifar10-classifier'")
    best = max(float(v.tags["val_accuracy"]) for v in registered)
    champion = client.get_model_version_by_alias("cifar10-classifier", "champion")
    vals = [f"{r.data.metrics['val/best_accuracy']:.4f}" for r in parallel]
    print(
        f"parallel: exit codes {codes}, statuses {[r.info.status for r in parallel]}, "
        f"complete curves {complete}, validation accuracies {vals}; of {len(registered)} "
        f"registered versions, champion is version {champion.version} at "
        f"{champion.tags['val_accuracy']}, the best registered being {best:.6f}"
    )


def steps_complete(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> bool:
    """Every curve has one value per step, with no step missing."""
    for key in run.data.metrics:
        if key.startswith("system/"):
            continue
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        if len(steps) != len(set(steps)):
            return False
        if (
            key == "train/loss"
            and steps
            and sorted(steps)
            != list(range(min(steps), max(steps) + 1, sorted(steps)[1] - sorted(steps)[0]))
        ):
            return False
    return True


def compare(client: mlflow.MlflowClient, run: mlflow.entities.Run, twin: mlflow.entities.Run):
    values = points = 0
    for key in twin.data.metrics:
        if key.startswith("system/"):
            continue
        ours = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        theirs = sorted((m.step, m.value) for m in client.get_metric_history(twin.info.run_id, key))
        steps = [s for s, _ in ours]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
        assert steps == [s for s, _ in theirs], f"{key}: steps differ from the twin's"
        if key not in ("train/epoch_seconds", "train/images_per_second"):
            assert ours == theirs, f"{key}: values differ from the twin's"
            values += len(ours)
        points += len(ours)
    weights = [checkpoint.load(Path(r.data.tags["checkpoint"]))["training"]["model"]
               for r in (run, twin)]  # fmt: skip
    same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    versions = {v.run_id: v for v in client.search_model_versions("name = 'cifar10-classifier'")}
    ours, theirs = versions[run.info.run_id], versions[twin.info.run_id]
    print(
        f"  {points} metric points, each step once; {values} values equal to the twin's "
        f"(timings aside); final weights bit-identical: {same}; registered validation "
        f"accuracy {ours.tags['val_accuracy']} (twin {theirs.tags['val_accuracy']}), test "
        f"{ours.tags['test_accuracy']} (twin {theirs.tags['test_accuracy']})"
    )


if __name__ == "__main__":
    main()
