"""Who may do what on the team's server, beyond one request: the server runs as
docs/team-server.md tells teams to (default_permission = NO_PERMISSIONS, --allowed-hosts), and
each refusal is checked by looking afterwards, as the owner or the admin, that nothing changed.
No training runs here: the runs and models are made through MLflow's client."""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit

import mlflow
import pytest
import requests
from helpers import cli_command
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient
from team_services import ADMIN, ADMIN_PASSWORD, logged_in

pytestmark = [pytest.mark.slow, pytest.mark.team]
MODEL = "alices-model"


def refused(attempt) -> str:
    """The error code MLflow's client raised for `attempt` (it must raise)."""
    with pytest.raises(MlflowException) as error:
        attempt()
    return error.value.error_code


def grant(tracking_server, username: str, kind: str, key: str, permission: str) -> None:
    """The admin gives `username` `permission` on one resource (in place of any before)."""
    with logged_in(ADMIN, ADMIN_PASSWORD):
        admin = AuthServiceClient(tracking_server.url)
        try:
            admin.grant_user_permission(username, kind, key, permission)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            admin.revoke_user_permission(username, kind, key)
            admin.grant_user_permission(username, kind, key, permission)


def test_a_member_without_edit_cannot_write_to_anothers_experiment(tracking_server, users, s3):
    with logged_in("alice", users["alice"]):
        alice = mlflow.MlflowClient(tracking_server.url)
        experiment_id = alice.create_experiment("alices-notes")
        run_id = alice.create_run(experiment_id).info.run_id
        alice.log_metric(run_id, "loss", 1.0)
    grant(tracking_server, "bob", "experiment", experiment_id, "READ")

    with logged_in("bob", users["bob"]):
        bob = mlflow.MlflowClient(tracking_server.url)
        assert bob.get_run(run_id).data.metrics == {"loss": 1.0}, "READ lets him look"
        writes = {
            "add a run": lambda: bob.create_run(experiment_id),
            "log a metric": lambda: bob.log_metric(run_id, "loss", 9.0),
            "tag the run": lambda: bob.set_tag(run_id, "owner", "bob"),
            "end the run": lambda: bob.set_terminated(run_id, "FAILED"),
            "rename the experiment": lambda: bob.rename_experiment(experiment_id, "bobs-now"),
            "delete the run": lambda: bob.delete_run(run_id),
        }
        codes = {what: refused(attempt) for what, attempt in writes.items()}
        assert codes == dict.fromkeys(writes, "PERMISSION_DENIED")
        with pytest.raises(requests.HTTPError, match="403"):  # the artifact proxy's own answer
            bob.log_text(run_id, "bob was here", "bob.txt")

    # Alice's run and experiment are as she left them, and nothing of bob's is in the bucket.
    with logged_in("alice", users["alice"]):
        run = alice.get_run(run_id)
        assert (run.info.status, run.info.lifecycle_stage) == ("RUNNING", "active")
        assert run.data.metrics == {"loss": 1.0} and "owner" not in run.data.tags
        assert alice.get_metric_history(run_id, "loss")[-1].value == 1.0
        assert alice.get_experiment(experiment_id).name == "alices-notes"
        assert [found.info.run_id for found in alice.search_runs([experiment_id])] == [run_id]
    assert not [key for key in s3.object_keys() if key.endswith("bob.txt")]

    grant(tracking_server, "bob", "experiment", experiment_id, "EDIT")
    with logged_in("bob", users["bob"]):
        assert bob.create_run(experiment_id).info.experiment_id == experiment_id


def test_a_member_cannot_move_the_alias_of_a_model_she_may_not_edit(
    tracking_server, users, tmp_path
):
    with logged_in("alice", users["alice"]):
        alice = mlflow.MlflowClient(tracking_server.url)
        run_id = alice.create_run(alice.create_experiment("alices-models")).info.run_id
        alice.create_registered_model(MODEL)
        for _ in range(2):
            alice.create_model_version(MODEL, f"runs:/{run_id}/model", run_id)
        alice.set_registered_model_alias(MODEL, "champion", "1")
    grant(tracking_server, "bob", "registered_model", MODEL, "READ")

    with logged_in("bob", users["bob"]):
        bob = mlflow.MlflowClient(tracking_server.url)
        assert bob.get_model_version_by_alias(MODEL, "champion").version == "1"
        moves = {
            "move champion": lambda: bob.set_registered_model_alias(MODEL, "champion", "2"),
            "drop champion": lambda: bob.delete_registered_model_alias(MODEL, "champion"),
            "tag a version": lambda: bob.set_model_version_tag(MODEL, "1", "gate", "x"),
        }
        codes = {what: refused(attempt) for what, attempt in moves.items()}
        assert codes == dict.fromkeys(moves, "PERMISSION_DENIED")
    bob_env = tracking_server.user_env("bob", users["bob"])
    done = subprocess.run(cli_command("promote", MODEL, "2"), env=bob_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.startswith(f"Error: the tracking server {tracking_server.url} refused "
                                  "'bob' in `promote` (")  # fmt: skip
    assert len(done.stderr.strip().splitlines()) == 1

    with logged_in("alice", users["alice"]):
        assert alice.get_model_version_by_alias(MODEL, "champion").version == "1"
        assert "gate" not in alice.get_model_version(MODEL, "1").tags


def test_a_member_cannot_create_users_or_grant_permissions(tracking_server, users):
    with logged_in("alice", users["alice"]):
        experiment_id = mlflow.MlflowClient(tracking_server.url).create_experiment("alices-keys")
    with logged_in("bob", users["bob"]):
        auth = AuthServiceClient(tracking_server.url)
        attempts = {
            "create a user": lambda: auth.create_user("eve", "eve-password-333"),
            "grant himself": lambda: auth.grant_user_permission(
                "bob", "experiment", experiment_id, "MANAGE"
            ),
            "make himself admin": lambda: auth.update_user_admin("bob", True),
            "change alice's password": lambda: auth.update_user_password("alice", "bobs-choice-1"),
        }
        codes = {what: refused(attempt) for what, attempt in attempts.items()}
        assert codes == dict.fromkeys(attempts, "PERMISSION_DENIED")

    with logged_in(ADMIN, ADMIN_PASSWORD):
        admin = AuthServiceClient(tracking_server.url)
        assert refused(lambda: admin.get_user("eve")) == "RESOURCE_DOES_NOT_EXIST"
        assert admin.get_user("bob").is_admin is False
        held = admin.get_user_permission("bob", "experiment", experiment_id)
        assert (held.permission, held.allowed) == ("NO_PERMISSIONS", False)
    with logged_in("alice", users["alice"]):  # her password is still hers
        assert mlflow.MlflowClient(tracking_server.url).get_experiment(experiment_id)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/2.0/mlflow/experiments/search?max_results=1"),
        ("GET", "/ajax-api/2.0/mlflow/experiments/search?max_results=1"),
        ("GET", "/ajax-api/2.0/mlflow/runs/search"),
        ("GET", "/api/2.0/mlflow-artifacts/artifacts?path=artifacts"),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/anonymous.txt"),
        ("GET", "/get-artifact?path=cifar_net.pth&run_uuid=0123456789abcdef0123456789abcdef"),
        ("GET", "/api/2.0/mlflow/registered-models/search"),
        ("GET", "/ajax-api/2.0/mlflow/registered-models/search"),
        ("GET", "/api/2.0/mlflow/model-versions/search"),
        ("POST", "/api/2.0/mlflow/registered-models/alias"),
        ("GET", "/model-versions/get-artifact?path=MLmodel&name=cifar10-classifier&version=1"),
    ],
)
def test_anonymous_requests_are_refused(tracking_server, method, path):
    answer = requests.request(method, tracking_server.url + path, data=b"x", timeout=30)
    assert answer.status_code == 401


def test_a_request_for_a_host_not_allowed_is_refused(tracking_server, users, tmp_path):
    """The server answers only its listed address (127.0.0.1:PORT): `localhost`, which it
    would answer by default, is refused, logged in or not."""
    port = urlsplit(tracking_server.url).port
    search = f"{tracking_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    login = ("alice", users["alice"])
    assert requests.get(search, auth=login, timeout=30).status_code == 200
    for host in (f"localhost:{port}", f"mlflow.attacker.example:{port}"):
        answer = requests.get(search, auth=login, headers={"Host": host}, timeout=30)
        assert answer.status_code == 403, host

    # A member who sets the unlisted address gets one line.
    env = {**tracking_server.user_env("alice", users["alice"]),
           "MLFLOW_TRACKING_URI": f"http://localhost:{port}"}  # fmt: skip
    done = subprocess.run(cli_command("promote", "some-model", "1"), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1
