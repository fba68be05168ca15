"""A tracking server that fails, answers with a web page, drops the connection or is not
there: every command says so in one line, naming the server, and never with a traceback.
(Refusals of logins and permissions are in tests/team, against a real server.)"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import PNG, TINY, free_port, point_mlflow_at, stand_in_server

from cifar_experiments.cli import cli

DOWN = {"error_code": "INTERNAL_ERROR", "message": "database is down"}
FAILING = (500, "application/json", json.dumps(DOWN).encode())
WEB_PAGE = (200, "text/html", b"<html><body><h1>Welcome to nginx!</h1>\n<p>It works.</p></html>")
PROXY_ERROR = (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1>\n</body></html>")
SERVERS = {
    "failing": (FAILING, "failed (HTTP 500)"),
    "a web page": (WEB_PAGE, "with a web page, not MLflow's API"),
    "a proxy's error page": (PROXY_ERROR, "failed (HTTP 502)"),
    "hanging up": (None, "cannot reach"),
}


def commands(image_folder, tmp_path) -> dict[str, list[str]]:
    image = tmp_path / "cat.png"
    image.write_bytes(PNG)
    return {
        "train": ["train", *TINY, "--data", str(image_folder)],
        "resume": ["train", "--resume", "0" * 32],
        "sweep": ["sweep", "--trials", "1", *TINY, "--data", str(image_folder)],
        "register": ["register", "--experiment", "cifar10"],
        "promote": ["promote", "cifar10-classifier", "1"],
        "compare": ["compare", "0" * 32, "1" * 32],
        "predict": ["predict", str(image)],
    }


def assert_one_line(result, server: str, says: str) -> None:
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1, result.output
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert server in errors[0] and says in errors[0], errors[0]


@pytest.fixture
def no_retries(monkeypatch):
    """MLflow retries a failing server for minutes; what is said after is the same."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@pytest.mark.parametrize(("answer", "says"), SERVERS.values(), ids=SERVERS)
def test_train_and_compare_say_what_the_server_did_in_one_line(
    image_folder, tmp_path, monkeypatch, no_retries, answer, says
):
    with stand_in_server(answer) as url:
        point_mlflow_at(url, monkeypatch)
        for name in ("train", "compare"):
            result = CliRunner().invoke(cli, commands(image_folder, tmp_path)[name])
            assert_one_line(result, url, says)


@pytest.mark.parametrize("command", ["resume", "sweep", "register", "promote", "predict"])
def test_every_command_says_a_failing_server_in_one_line(
    image_folder, tmp_path, monkeypatch, no_retries, command
):
    with stand_in_server(FAILING) as url:
        point_mlflow_at(url, monkeypatch)
        result = CliRunner().invoke(cli, commands(image_folder, tmp_path)[command])
        assert_one_line(result, url, "failed (HTTP 500)")


def test_a_server_that_is_not_there_is_one_line(image_folder, tmp_path, monkeypatch, no_retries):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    point_mlflow_at(url, monkeypatch)
    for name in ("train", "compare", "register"):
        result = CliRunner().invoke(cli, commands(image_folder, tmp_path)[name])
        assert_one_line(result, url, "cannot reach")


def test_credentials_in_the_address_are_never_said(image_folder, tmp_path, monkeypatch, no_retries):
    with stand_in_server(FAILING) as url:
        point_mlflow_at(url.replace("//", "//alice:s3cret@"), monkeypatch)
        result = CliRunner().invoke(cli, commands(image_folder, tmp_path)["compare"])
        assert_one_line(result, url, "failed (HTTP 500)")
        assert "s3cret" not in result.output
