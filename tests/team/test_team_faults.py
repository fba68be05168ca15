"""The team's services failing under a training: PostgreSQL stopped, the tracking server
killed. Short outages are ridden out with nothing lost; a long one fails the run in one line,
keeps its checkpoint, and the run resumes once the server is back."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import mlflow
import pytest
from helpers import assert_every_point_once, size_of, wait_until
from team_services import Training, logged_in, run_id_of, train

pytestmark = [pytest.mark.slow, pytest.mark.team]

EPOCHS = 6
ARGS = ["--epochs", str(EPOCHS), "--batch-size", "2", "--log-every", "1", "--no-register"]
# What a training says each time MLflow's client tries a request again (the server is gone).
RETRYING = "The tracking server "
# The server's access log line for a request it failed (HTTP 5xx).
FAILED_REQUEST = re.compile(r'" 5\d\d ')


@contextlib.contextmanager
def taken_away(stop: Callable[[], None], start: Callable[[], None]) -> Iterator[None]:
    """A service stopped for the block, and started again however the block ends."""
    stop()
    try:
        yield
    finally:
        start()


def test_a_training_rides_out_postgres_stopped_and_the_server_killed(
    tracking_server, postgres, users, image_folder, tmp_path
):
    env = tracking_server.user_env("alice", users["alice"])
    training = Training(env, tmp_path, *ARGS, "--data", str(image_folder),
                        "--experiment-name", "faults")  # fmt: skip
    training.wait_for("epoch 1/")
    log, since = tracking_server.log_path, size_of(tracking_server.log_path)

    def failed_requests() -> int:
        return len(FAILED_REQUEST.findall(log.read_bytes()[since:].decode(errors="replace")))

    with taken_away(postgres.stop, postgres.start):
        # The outage lasts until the server has failed the training's request and its retry.
        wait_until(lambda: failed_requests() >= 2, "a request failed, then retried",
                   training.process)  # fmt: skip
    training.wait_for("epoch 3/")
    with taken_away(tracking_server.kill, tracking_server.start):
        training.wait_for(RETRYING)  # the client found no server, and tries again
        training.wait_for(RETRYING)
        assert training.process.poll() is None, "still training, its logging held up"
    assert training.finish() == 0, training.output[-3000:]

    run_id = run_id_of(training.output)
    with logged_in("alice", users["alice"]):
        client = mlflow.MlflowClient(tracking_server.url)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert_every_point_once(client, run_id, EPOCHS)


def test_an_outage_longer_than_the_retries_fails_in_one_line_and_the_run_resumes(
    tracking_server, users, image_folder, tmp_path
):
    # The client gives up after about 3 s instead of MLflow's 4 minutes.
    impatient = tracking_server.user_env(
        "alice", users["alice"], MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
    )  # fmt: skip
    training = Training(impatient, tmp_path, *ARGS, "--data", str(image_folder),
                        "--experiment-name", "faults")  # fmt: skip
    training.wait_for("epoch 2/")
    with taken_away(tracking_server.kill, tracking_server.start):
        assert training.finish() == 1
    failure = re.fullmatch(
        rf"Error: lost the tracking server {tracking_server.url} \(connection (refused|aborted)\) "
        r"during run ([0-9a-f]{32}); its checkpoint is in (\S+)\. Once the server answers, "
        r"continue it with: cifar-experiments train --resume \2",
        training.output.strip().splitlines()[-1],
    )
    assert failure and "Traceback" not in training.output, training.output[-3000:]
    _, run_id, checkpoint = failure.groups()
    assert (tmp_path / checkpoint).is_file()

    env = tracking_server.user_env("alice", users["alice"])
    done = train(env, tmp_path, "--resume", run_id, "--data", str(image_folder))
    assert done.returncode == 0, done.stderr[-3000:]
    with logged_in("alice", users["alice"]):
        client = mlflow.MlflowClient(tracking_server.url)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert_every_point_once(client, run_id, EPOCHS)
