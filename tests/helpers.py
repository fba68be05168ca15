"""The toolbox that test modules and benchmarks share (neither imports the other's modules):
tiny synthetic images and trainings, this interpreter for child processes, free ports,
servers started and stopped with their workers, and checks of what a run recorded."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import mlflow
import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image

from cifar_experiments import callbacks, data, engine
from cifar_experiments.config import TrainConfig
from cifar_experiments.distributed import World
from cifar_experiments.predictions import Predictions
from cifar_experiments.sweep import parent_run

T = TypeVar("T")
CLASSES = ("cat", "dog", "frog")
TRAIN_PER_CLASS = 10
TEST_PER_CLASS = 4
ROOT = Path(__file__).resolve().parents[1]
# A training that takes seconds on tiny data, with a point of the loss curve every step. In
# fp32: precision=auto picks bf16 autocast on CPUs with bf16 units, where a few steps of tiny
# batches may diverge on one kind of CPU and not another; these tests are not about precision
# (test_engine's and test_speedups' are, and pin the one they test).
TINY = ["--epochs", "2", "--batch-size", "8", "--log-every", "1", "--precision", "fp32"]


def synthetic_images(n: int, label: int, seed: int) -> np.ndarray:
    """(n, 32, 32, 3) uint8: a class colour plus noise, so a few steps can learn something."""
    rng = np.random.default_rng(seed)
    colour = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label % 3], dtype=np.int16)
    noise = rng.integers(-40, 40, size=(n, 32, 32, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def tiny_set(per_class: int, seed: int) -> data.ImageSet:
    """`per_class` synthetic images of each of three classes, as training reads them."""
    arrays = [synthetic_images(per_class, label, seed + label) for label in range(3)]
    images = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2)
    labels = torch.arange(3).repeat_interleave(per_class)
    return data.ImageSet(images.contiguous(), labels)


def write_image_folder(root: Path, counts: dict[str, int], fmt: str = "PNG") -> Path:
    """root/<split>/<class>/NNNN.<ext> with counts[split] images of each class."""
    for split, count in counts.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(synthetic_images(count, label, seed=label + 10 * count)):
                (folder / f"{i:04d}.{fmt.lower()}").write_bytes(encode(image, fmt))
    return root


def two_steps(world: World, steps: int = 2) -> dict[str, torch.Tensor]:
    """The tutorial net after `steps` steps of SGD with momentum on 12 tiny augmented images
    (one batch of 12 a step), taken by the processes of `world` together: rank 0's weights."""
    config = TrainConfig(epochs=steps, batch_size=12, lr=0.05, schedule="constant",
                         keep_epoch="last", precision="fp32", seed=3)  # fmt: skip
    runtime = engine.Runtime.resolve("cpu", "fp32")
    state = engine.TrainingState.create(config, tiny_set(4, 0), CLASSES, runtime, world)
    engine.fit(state, tiny_set(1, 50))
    return state.model.state_dict()


def torchrun_command(
    *args: str, launch: Sequence[str] = ("--standalone",), nproc: int = 2
) -> list[str]:
    """`torchrun LAUNCH --nproc-per-node NPROC ARGS` as a command for a child process."""
    return [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc-per-node={nproc}",
            *args]  # fmt: skip


# Processes of one training talk over loopback, a thread each on the test machine's cores.
TORCHRUN_ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


class RecordingTracker(callbacks.Tracker):
    """Keeps every metric point it is given, by name: [(step, value), ...]."""

    def __init__(self) -> None:
        self.points: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.points.setdefault(name, []).append((step, value))


def unavailable(reason: str) -> NoReturn:
    """A service the test needs is missing here: in CI (`CI` set, as .ci/run sets it) that
    fails the run, which must run every test; elsewhere the test is skipped."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI runs every test")
    pytest.skip(reason)


def fill(disk: Path) -> Path:
    """Fill the filesystem at `disk` to its last byte with one file: that file, whose removal
    frees the space again."""
    filler = disk / "filler"
    with open(filler, "wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError:  # No space left on device: it is full
            pass
    return filler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def copy_of_store(empty: Path, root: Path) -> str:
    """`empty` copied into `root`, as MLflow would have made it there: the one path it stores
    is the Default experiment's artifact folder, under the folder it was made from."""
    shutil.copyfile(empty, root / "mlflow.db")
    with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (str(root / "mlruns" / "0"),))  # fmt: skip
    return f"sqlite:///{root / 'mlflow.db'}"


def point_mlflow_at(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's fluent API, and the processes a test starts, on `store` for one test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)


MLFLOW_SELECTION = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


def local_env(**extra: str) -> dict[str, str]:
    """This environment with this interpreter first on PATH: `mlflow run --env-manager local`
    and `mlflow models serve --env-manager local` start plain `python`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    # Not the experiment or run this process last used: `mlflow.set_experiment` leaves its id
    # in os.environ, and a child would train there (or `mlflow run` refuse two experiments).
    inherited = {k: v for k, v in os.environ.items() if k not in MLFLOW_SELECTION}
    return {**inherited, "PATH": path, **extra}


def cli_command(*args: str) -> list[str]:
    """`cifar-experiments ARGS` as a command for a child process, run by this interpreter."""
    return [sys.executable, "-m", "cifar_experiments", *args]


def mlflow_run_command(*args: str, **params: object) -> list[str]:
    """`mlflow run` of this project as a command for a child process: ARGS for `mlflow run`,
    then each of PARAMS as `-P name=value`."""
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", *args]
    for name, value in params.items():
        command += ["-P", f"{name}={value}"]
    return command


def answers(url: str) -> bool:
    """Whether `url` answers with success (a model server answers 404 until its model loads)."""
    try:
        return requests.get(url, timeout=2).ok
    except (requests.ConnectionError, requests.Timeout):  # not up yet, or not ours to answer
        return False


def wait_until(
    check: Callable[[], bool], what: str, process: subprocess.Popen | None = None,
    seconds: float = 120,
) -> None:  # fmt: skip
    """Return once `check()` holds; fail if `process` exits first or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while not check():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {seconds:.0f} s")
        time.sleep(0.3)


def stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started in a session of its own and every worker it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class PortTaken(RuntimeError):
    """A server found its port taken: another process bound it after free_port let it go."""


# How uvicorn, gunicorn, werkzeug and PostgreSQL say the port they were given is taken.
ADDRESS_IN_USE = re.compile(r"address already in use|connection in use|could not bind", re.I)


def on_a_free_port(start: Callable[[int], T], attempts: int = 5) -> T:
    """`start(port)` on a loopback port free a moment ago. The number is only a guess once
    free_port's socket closes, so a start that raises PortTaken is tried on another."""
    for _ in range(attempts - 1):
        with contextlib.suppress(PortTaken):
            return start(free_port())
    return start(free_port())


def until_healthy(
    process: subprocess.Popen, what: str, health_url: str, log_path: Path, since: int = 0,
    seconds: float = 120,
) -> None:  # fmt: skip
    """Return once the server `process` answers `health_url`; else stop it and raise PortTaken
    or, for any other early exit or no answer in time, RuntimeError with its log (from byte
    `since`)."""
    try:
        wait_until(lambda: answers(health_url), what, process, seconds)
    except RuntimeError as error:
        stop_group(process)
        raise failed_start(str(error), log_path, since) from None


def failed_start(what: str, log_path: Path, since: int) -> RuntimeError:
    """PortTaken when the server's log (from byte `since`) says its port was taken, else a
    RuntimeError; either says `what` and ends with the log."""
    said = log_path.read_bytes()[since:].decode(errors="replace")
    kind = PortTaken if ADDRESS_IN_USE.search(said) else RuntimeError
    return kind(f"{what}: {said[-3000:]}")


def size_of(log_path: Path) -> int:
    """Where a log that a restarted server appends to ends now: its next start's words begin."""
    return log_path.stat().st_size if log_path.exists() else 0


@contextlib.contextmanager
def running(
    command: Callable[[int], list[str]], env: dict[str, str], health_path: str, log_path: Path,
    seconds: float = 120,
) -> Iterator[str]:  # fmt: skip
    """A server started by `command(port)` on a free loopback port (its output in `log_path`):
    its URL once `health_path` answers, for the block; then it stops with its workers."""

    def start(port: int) -> tuple[subprocess.Popen, str]:
        args, url = command(port), f"http://127.0.0.1:{port}"
        since = size_of(log_path)
        with log_path.open("a") as log:
            process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        until_healthy(process, " ".join(args[:3]), url + health_path, log_path, since, seconds)
        return process, url

    process, url = on_a_free_port(start)
    try:
        yield url
    finally:
        stop_group(process)


class _StandIn(http.server.BaseHTTPRequestHandler):
    """Answers every request the same way: an error page, a web page, or a dropped line."""

    answer: tuple[int, str, bytes] | None = None  # status, content type, body; None: hang up

    def _respond(self) -> None:
        if self.answer is None:
            self.connection.close()
            return
        status, content_type, body = self.answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _respond

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def stand_in_server(answer: tuple[int, str, bytes] | None) -> Iterator[str]:
    """A server on loopback that answers every request with `answer` (None: closes the
    connection unanswered), in a thread: its URL while the block runs."""
    handler = type("Answering", (_StandIn,), {"answer": answer})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# MLflow refuses to unpickle a model under this setting; ours need nothing unpickled.
NO_PICKLES = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
# `mlflow server` and `mlflow ui` without their job runner (worker processes busy with GenAI
# features only, which took 20 s of CPU under one plain server in a run of the suite).
NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def serve(
    model_uri: str, tracking_uri: str, log_path: Path
) -> contextlib.AbstractContextManager[str]:
    """`mlflow models serve` of `model_uri` on a free loopback port: its URL, for the block. It
    runs as a careful team serves: no pickled code may load."""
    env = local_env(MLFLOW_TRACKING_URI=tracking_uri, **NO_PICKLES)
    return running(lambda port: model_server_command(model_uri, port), env, "/ping", log_path)


def model_server_command(model_uri: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip


def post(url: str, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict]:
    """POST `body` (JSON-encoded unless bytes) to the model server's /invocations: the status
    and the JSON answer ({} when the answer is not JSON)."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    answer = requests.post(f"{url}/invocations", data=payload, headers=headers, timeout=60)
    try:
        return answer.status_code, answer.json()
    except requests.JSONDecodeError:
        return answer.status_code, {}


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode()


IMAGES = synthetic_images(2, 0, 7)
PNG, JPEG = encode(IMAGES[0], "PNG"), encode(IMAGES[1], "JPEG")


def binomial_tail(successes: int, trials: int) -> float:
    """P(X >= successes) for X ~ Binomial(trials, 1/2), summed term by term (not scipy's)."""
    return sum(math.comb(trials, k) for k in range(successes, trials + 1)) / 2**trials


def hand_made_predictions(
    right: Sequence[bool], labels: Sequence[int], ids: Sequence[int] | None = None,
    digest: str = "data",
) -> Predictions:  # fmt: skip
    """Predictions of CLASSES, right exactly where `right` says (a wrong answer names the
    next class), for the images `ids` (default 0, 1, 2, ...) of the data `digest`."""
    truth = np.array(labels, dtype=np.int16)
    answered = np.where(right, truth, (truth + 1) % len(CLASSES)).astype(np.int16)
    ids_given = np.arange(len(truth)) if ids is None else np.asarray(ids, dtype=np.int64)
    p_true = np.where(right, 0.9, 0.1).astype(np.float32)
    return Predictions(CLASSES, ids_given, truth, answered, p_true, digest, "split")


def assert_labels(answer: dict, count: int) -> None:
    rows = answer["predictions"]
    assert len(rows) == count
    for row in rows:
        assert row["label"] in CLASSES and row["label"] == CLASSES[row["class_index"]]
        assert sum(row[f"prob_{c}"] for c in CLASSES) == pytest.approx(1.0, abs=1e-6)


def assert_every_point_once(client: mlflow.MlflowClient, run_id: str, epochs: int) -> None:
    """No figure is missing or logged twice: each epoch's at steps 1..epochs, the training
    loss (logged every step) at steps 1, 2, 3, ... (system metrics are samples, not counted)."""
    keys = [key for key in client.get_run(run_id).data.metrics if not key.startswith("system/")]
    history = {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in keys}
    assert history["val/accuracy"] == history["train/epoch_loss"] == list(range(1, epochs + 1))
    assert history["train/loss"] == list(range(1, len(history["train/loss"]) + 1))
    assert {key: steps for key, steps in history.items() if len(set(steps)) != len(steps)} == {}


def steps_logged(run: mlflow.entities.Run) -> dict[str, list[int]]:
    """Every metric's steps as the run logged them, but system metrics (machines' samples)."""
    client = mlflow.MlflowClient()
    return {
        key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
        for key in run.data.metrics
        if not key.startswith("system/")
    }


def rank_process(launcher_pid: int, rank: int) -> psutil.Process | None:
    """The process of rank `rank` that a torchrun agent (or `train --nproc-per-node`) runs."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if child.environ().get("RANK") == str(rank):
                return child
    return None


# A sweep's runs: its parent, and the children tagged with it.


def all_children(parent_run_id: str) -> list[mlflow.entities.Run]:
    """The sweep's trials and its confirmation's runs."""
    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{parent_run.PARENT_TAG}` = '{parent_run_id}'",
        output_format="list",
    )


def children(parent_run_id: str) -> list[mlflow.entities.Run]:
    """The sweep's trials, in order."""
    trials = [r for r in all_children(parent_run_id) if parent_run.TRIAL_TAG in r.data.tags]
    return sorted(trials, key=lambda run: int(run.data.tags[parent_run.TRIAL_TAG]))


def only_parent() -> mlflow.entities.Run:
    """The one run of the store that is no one's child: the sweep's parent."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (parent,) = [run for run in runs if parent_run.PARENT_TAG not in run.data.tags]
    return parent


def sweep_command(folder: Path, *extra: str) -> list[str]:
    """A sweep on `folder` with small batches, as a command line for a process of its own."""
    return cli_command("sweep", "--data", str(folder), "--batch-size", "8", *extra)
