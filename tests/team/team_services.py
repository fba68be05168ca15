"""The team stack's fixed names and secrets (conftest.py starts it; tests log in with them),
and how tests train against it."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click.testing
import pytest
from click.testing import CliRunner
from helpers import cli_command, point_mlflow_at

from cifar_experiments.cli import cli

ADMIN, ADMIN_PASSWORD = "admin", "team-admin-password-1"
DB_PASSWORD = "pg-secret-7"
BUCKET = "team-artifacts"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "moto-secret-key-9",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
LIMIT = 300  # seconds any one training may take


@contextlib.contextmanager
def logged_in(username: str, password: str) -> Iterator[None]:
    """MLflow's client in this process, as `username`, for the block."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", username)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


def refused_here(env: dict[str, str], *args: str) -> click.testing.Result:
    """`cifar-experiments <args>` run in this process as `env`'s member runs it, for commands
    the server refuses before any training: a process of their own would spend its seconds
    importing torch and MLflow. A traceback would leave `exception` other than SystemExit."""
    with pytest.MonkeyPatch.context() as patch:
        point_mlflow_at(env["MLFLOW_TRACKING_URI"], patch)
        return CliRunner().invoke(cli, list(args), env=env)


def start(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen:
    """`cifar-experiments <args>` in the background, its output (both streams) in one pipe."""
    return subprocess.Popen(cli_command(*args), env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def train(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command("train", *args), env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=LIMIT)  # fmt: skip


def run_id_of(output: str) -> str:
    return re.search(r"Run ([0-9a-f]{32}) finished", output).group(1)


class Training:
    """`cifar-experiments train` in the background, its output read line by line, so a test
    can act at a moment of the training (stop it, take a service away)."""

    def __init__(self, env: dict[str, str], cwd: Path, *args: str) -> None:
        self.process = start(env, cwd, "train", *args)
        self.lines: list[str] = []

    def wait_for(self, start: str) -> None:
        """Read on until a line starts with `start`."""
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith(start):
                return
        raise AssertionError(f"no line starting {start!r} in:\n{self.output[-3000:]}")

    def finish(self) -> int:
        self.lines += self.process.stdout.readlines()
        return self.process.wait(timeout=LIMIT)

    @property
    def output(self) -> str:
        return "".join(self.lines)
