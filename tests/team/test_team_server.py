"""One tracking server for a team, as its members meet it: logins, runs in PostgreSQL,
artifacts in the bucket, the registry, serving from the server, and a run resumed from
another working directory."""

from __future__ import annotations

import functools
import re
import signal
import subprocess
from pathlib import Path

import mlflow
import psycopg
import pytest
from helpers import (
    JPEG,
    TINY,
    assert_every_point_once,
    b64,
    cli_command,
    model_server_command,
    post,
    running,
)
from team_services import (
    ADMIN,
    ADMIN_PASSWORD,
    DB_PASSWORD,
    S3_KEYS,
    Training,
    logged_in,
    refused_here,
    run_id_of,
    train,
)

pytestmark = [pytest.mark.slow, pytest.mark.team]


def test_a_member_trains_registers_and_serves_through_the_server(
    tracking_server, users, postgres, s3, image_folder, tmp_path
):
    env = tracking_server.user_env("alice", users["alice"])
    done = train(env, tmp_path, *TINY, "--data", str(image_folder), "--experiment-name", "team")
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = run_id_of(done.stdout)

    # The address to open is the server's own page of the run.
    last = done.stdout.strip().splitlines()[-1]
    assert f"Browse it: open {tracking_server.url}/#/experiments/" in last
    assert "mlflow ui" not in last and users["alice"] not in done.stdout + done.stderr

    # The run is in PostgreSQL, made by alice, and its files are in the bucket.
    with psycopg.connect(postgres.url("mlflow", "postgresql")) as db:
        status, user = db.execute(
            "SELECT status, user_id FROM runs WHERE run_uuid = %s", (run_id,)
        ).fetchone()
    assert (status, user) == ("FINISHED", "alice")
    keys = s3.object_keys()
    assert any(key.endswith(f"{run_id}/artifacts/cifar_net.pth") for key in keys)
    assert any(f"{run_id}/artifacts/evaluation/val/" in key for key in keys)

    # No secret of anyone's lands in the run: params, tags, description, files.
    secrets = [users["alice"], ADMIN_PASSWORD, DB_PASSWORD, S3_KEYS["AWS_SECRET_ACCESS_KEY"]]
    with logged_in("alice", users["alice"]):
        run = mlflow.MlflowClient(tracking_server.url).get_run(run_id)
        files = Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, tracking_uri=tracking_server.url, dst_path=str(tmp_path / "files")
        ))  # fmt: skip
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    recorded += [path.read_bytes().decode("latin-1") for path in files.rglob("*") if path.is_file()]
    assert not [secret for secret in secrets if any(secret in text for text in recorded)]

    # Registered, and served from the server by alias, as any member would serve it.
    assert "Registered cifar10-classifier version" in done.stdout
    command = functools.partial(model_server_command, "models:/cifar10-classifier@champion")
    with running(command, env, "/ping", tmp_path / "serve.log") as url:
        status, answer = post(url, {"dataframe_records": [{"image": b64(JPEG)}]})
    assert status == 200 and answer["predictions"][0]["label"]


def test_a_run_stopped_on_one_machine_resumes_on_another(
    tracking_server, users, image_folder, tmp_path_factory
):
    """Two working directories stand for two machines: the second has no checkpoint file,
    and takes it from the bucket through the server."""
    env = tracking_server.user_env("bob", users["bob"])
    first, second = tmp_path_factory.mktemp("machine-a"), tmp_path_factory.mktemp("machine-b")
    # fp32 pinned: batches of 2 at the recipe's rate go NaN under bf16 autocast, which
    # precision=auto picks on CPUs with bf16 units, and this test is about resuming.
    training = Training(env, first, "--epochs", "4", "--batch-size", "2", "--log-every", "1",
                        "--precision", "fp32", "--data", str(image_folder),
                        "--experiment-name", "bobs", "--no-register")  # fmt: skip
    training.wait_for("epoch 1/4")  # stop it once its first epoch is checkpointed
    training.process.send_signal(signal.SIGINT)
    assert training.finish() != 0
    stopped = re.search(r"run ([0-9a-f]{32}) is KILLED", training.output)
    assert stopped, training.output[-3000:]
    run_id = stopped.group(1)
    for leftover in (first / "checkpoints").glob("*"):
        leftover.unlink()  # machine A's disk is not machine B's

    done = train(env, second, "--resume", run_id, "--data", str(image_folder))
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_id_of(done.stdout) == run_id
    client = mlflow.MlflowClient(tracking_server.url)
    with logged_in("bob", users["bob"]):
        assert client.get_run(run_id).info.status == "FINISHED"
        assert_every_point_once(client, run_id, epochs=4)  # across the two machines


@pytest.mark.parametrize("user", ["alice", "mallory"], ids=["wrong password", "unknown user"])
def test_a_login_the_server_refuses_is_one_line_without_the_password(
    tracking_server, users, image_folder, tmp_path, user
):
    env = tracking_server.user_env(user, "not-a-password-of-theirs")
    done = refused_here(env, "train", *TINY, "--data", str(image_folder))
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit)
    assert done.stderr.strip() == (
        f"Error: the tracking server {tracking_server.url} refused the login of {user!r}: check "
        "MLFLOW_TRACKING_PASSWORD"
    )
    assert "not-a-password-of-theirs" not in done.output


def test_read_only_members_are_refused_before_any_data_until_granted_edit(
    tracking_server, users, image_folder, tmp_path
):
    from mlflow.server.auth.client import AuthServiceClient

    with logged_in("alice", users["alice"]):
        experiment_id = mlflow.MlflowClient(tracking_server.url).create_experiment("alices")
    with logged_in(ADMIN, ADMIN_PASSWORD):
        AuthServiceClient(tracking_server.url).grant_user_permission(
            "bob", "experiment", experiment_id, "READ"
        )
    bob = tracking_server.user_env("bob", users["bob"])
    missing = tmp_path / "not-read-yet"
    missing.mkdir()  # an empty folder: reading it would fail, and it is never read
    done = refused_here(bob, "train", *TINY, "--data", str(missing), "--experiment-name", "alices")
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit)
    assert done.stderr.strip() == (
        f"Error: bob may not add runs to experiment 'alices' on {tracking_server.url}: that "
        "needs EDIT permission on it, which its owner or an admin can grant"
    )

    # As docs/team-server.md says, the admin grants it; then bob trains there.
    with logged_in(ADMIN, ADMIN_PASSWORD):
        admin = AuthServiceClient(tracking_server.url)
        admin.revoke_user_permission("bob", "experiment", experiment_id)
        admin.grant_user_permission("bob", "experiment", experiment_id, "EDIT")
    done = train(bob, tmp_path, *TINY, "--data", str(image_folder), "--experiment-name",
                 "alices", "--no-register")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_members_runs_are_compared_through_the_server(tracking_server, users, image_folder,
                                                           tmp_path):  # fmt: skip
    """compare reads both runs' predictions from the bucket through the server, once bob's
    experiment is shared with alice."""
    from mlflow.server.auth.client import AuthServiceClient

    runs = []
    for member, seed in (("alice", "0"), ("bob", "1")):
        env = tracking_server.user_env(member, users[member])
        done = train(env, tmp_path, *TINY, "--seed", seed, "--val-fraction", "0.5",
                     "--no-register", "--data", str(image_folder),
                     "--experiment-name", f"{member}-compared")  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(run_id_of(done.stdout))
    with logged_in(ADMIN, ADMIN_PASSWORD):
        experiment_id = mlflow.MlflowClient(tracking_server.url).get_run(runs[1]).info.experiment_id
        AuthServiceClient(tracking_server.url).grant_user_permission(
            "alice", "experiment", experiment_id, "READ"
        )
    env = tracking_server.user_env("alice", users["alice"])
    done = subprocess.run(cli_command("compare", *runs), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "15 val images held out by both" in done.stdout and "p = " in done.stdout


def test_a_member_with_no_permission_gets_one_line_from_every_command(
    tracking_server, users, image_folder, tmp_path
):
    """The server's default_permission is NO_PERMISSIONS, and bob has no grant on alice's
    experiment: each command tells him so in one line naming him."""
    alice = tracking_server.user_env("alice", users["alice"])
    done = train(alice, tmp_path, *TINY, "--data", str(image_folder), "--experiment-name",
                 "alices-private", "--model-name", "alices-private-model")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = run_id_of(done.stdout)
    image = next((image_folder / "test").rglob("*.jpg"))
    bob = tracking_server.user_env("bob", users["bob"])
    commands = {
        "train": ["train", *TINY, "--data", str(image_folder), "--experiment-name",
                  "alices-private"],
        "resume": ["train", "--resume", run_id],
        "sweep": ["sweep", "--trials", "1", *TINY, "--data", str(image_folder),
                  "--experiment-name", "alices-private"],
        "register": ["register", "--run-id", run_id, "--model-name", "bobs-model"],
        "promote": ["promote", "alices-private-model", "1"],
        "compare": ["compare", run_id, run_id],
        "predict": ["predict", str(image), "--model", "models:/alices-private-model@champion"],
    }  # fmt: skip
    for name, args in commands.items():
        done = refused_here(bob, *args)
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
        assert done.exit_code != 0 and len(errors) == 1, (name, done.output[-3000:])
        assert isinstance(done.exception, SystemExit), (name, repr(done.exception))
        assert "bob" in errors[0] and tracking_server.url in errors[0], (name, errors[0])
