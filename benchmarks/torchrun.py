"""torchrun on real data: one training in two processes against the same in one.

    python benchmarks/torchrun.py /tmp/cifar10-holdout [--epochs 3]

In a fresh SQLite store, the tutorial Net for `--epochs` epochs: (1) one process with the
machine's cores, then `torchrun --standalone --nproc-per-node 2 -m cifar_experiments train`
(a thread per process): wall time, seconds per epoch, test accuracy, and what the run of the
two processes holds (one run, its status, world_size, steps logged twice, its epoch models
with their validation accuracy); (2) `register --run-id RUN --epoch 1` of that run; (3) the
same two-process training under `--max-restarts 1`, its rank 1 killed with SIGKILL early in
epoch 2: the runs it leaves. Prints what it measured. Not part of the test suite (minutes,
real data).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared toolbox
import mlflow
from helpers import cli_command, local_env, rank_process, steps_logged, torchrun_command

from cifar_experiments.tracking import project_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="torchrun-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = local_env(MLFLOW_TRACKING_URI=uri, GLOO_SOCKET_IFNAME="lo")
    env.pop(project_run.ENV, None)
    subprocess.run(["mlflow", "db", "upgrade", uri], env=env, check=True, capture_output=True)
    mlflow.set_tracking_uri(uri)
    train = ["train", "--data", args.folder, "--epochs", str(args.epochs), "--register", "false",
             "--checkpoint-dir", str(work / "checkpoints")]  # fmt: skip
    print(f"store {uri}, {args.epochs} epochs of the tutorial Net on {args.folder}")

    def timed(name: str, command: list[str]) -> mlflow.entities.Run:
        started = time.perf_counter()
        subprocess.run(command, env=env, cwd=work, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        (run,) = mlflow.search_runs(filter_string=f"attributes.run_name = '{name}'",
                                    search_all_experiments=True, output_format="list")  # fmt: skip
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/epoch_seconds")
        epochs = ", ".join(f"{m.value:.1f}" for m in sorted(history, key=lambda m: m.step))
        print(f"{name}: {seconds:.1f} s in all; epochs {epochs} s; test accuracy "
              f"{run.data.metrics['test_accuracy']:.2%}")  # fmt: skip
        return run

    one = timed("one-process", cli_command(*train, "--run-name", "one-process"))
    two = timed("two-processes", torchrun_command("-m", "cifar_experiments", *train,
                                                  "--run-name", "two-processes"))  # fmt: skip
    print(f"  test accuracy, two processes against one: "
          f"{100 * (two.data.metrics['test_accuracy'] - one.data.metrics['test_accuracy']):+.2f} "
          "points")  # fmt: skip
    describe(two)

    registered = subprocess.run(
        cli_command("register", "--run-id", two.info.run_id, "--epoch", "1", "--model-name",
                    "torchrun-epochs"),
        env=env, cwd=work, capture_output=True, text=True,
    )  # fmt: skip
    print(f"register --epoch 1: exit {registered.returncode}: {registered.stdout.strip()}")

    restarted = torchrun_command(
        "-m", "cifar_experiments", *train, "--run-name", "restarted",
        launch=("--standalone", "--max-restarts", "1"),
    )  # fmt: skip
    launcher = subprocess.Popen(restarted, env=env, cwd=work, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
    while launcher.poll() is None and not epoch_logged("restarted"):
        time.sleep(0.2)
    time.sleep(2.0)  # into epoch 2
    rank_1 = rank_process(launcher.pid, 1)
    assert rank_1 is not None, "rank 1 is gone already"
    rank_1.send_signal(signal.SIGKILL)
    print(f"killed rank 1 (pid {rank_1.pid}) with SIGKILL; torchrun exited {launcher.wait()}")
    describe(mlflow.search_runs(filter_string="attributes.run_name = 'restarted'",
                                search_all_experiments=True, output_format="list"))  # fmt: skip


def epoch_logged(name: str) -> bool:
    runs = mlflow.search_runs(filter_string=f"attributes.run_name = '{name}'",
                              search_all_experiments=True, output_format="list")  # fmt: skip
    return bool(runs) and "val/accuracy" in runs[0].data.metrics


def describe(found: mlflow.entities.Run | list[mlflow.entities.Run]) -> None:
    runs = found if isinstance(found, list) else [found]
    for run in runs:
        steps = steps_logged(run)
        twice = sorted(key for key, s in steps.items() if len(s) != len(set(s)))
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list",
        )  # fmt: skip
        epochs = sorted(
            (int(m.tags["epoch"]), next(x.value for x in m.metrics if x.key == "val/accuracy"))
            for m in models
            if "epoch" in m.tags
        )
        print(
            f"  run {run.info.run_name} ({len(runs)} run(s) of that name): {run.info.status}, "
            f"test accuracy {run.data.metrics.get('test_accuracy', float('nan')):.2%}, "
            f"world_size {run.data.params.get('world_size')}, validation points at epochs "
            f"{sorted(steps['val/accuracy'])}, metrics with a step twice: {twice or 'none'}; "
            "epoch models (epoch, validation accuracy): "
            + ", ".join(f"({e}, {v:.4f})" for e, v in epochs)
        )


if __name__ == "__main__":
    main()
