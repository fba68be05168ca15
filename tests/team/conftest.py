"""A team's tracking stack on loopback, started for these tests and stopped after: PostgreSQL 15
(tracking store, users, Optuna), moto's S3 server (the artifact bucket) and `mlflow server`
with the basic-auth app, artifacts proxied to the bucket.

Nothing is left running: each service stops at the end of the session, and a test that stops
one (a fault) starts it again.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    NO_JOBS,
    failed_start,
    local_env,
    on_a_free_port,
    running,
    size_of,
    stop_group,
    unavailable,
    until_healthy,
)
from team_services import ADMIN, ADMIN_PASSWORD, BUCKET, DB_PASSWORD, S3_KEYS, logged_in


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    """A PostgreSQL cluster in a temporary folder, on a free loopback port."""

    bin: Path
    data: Path
    port: int
    as_postgres: list[str]  # runs a command as the `postgres` user when we are root

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres:{DB_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(self.bin / "pg_ctl"), "-D", str(self.data),
                        "-w", "-s", *args], check=True, capture_output=True)  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        log = self.data / "server.log"
        since = size_of(log)
        try:
            self.pg_ctl("-o", options, "-l", str(log), "start")
        except subprocess.CalledProcessError:
            raise failed_start("PostgreSQL did not start", log, since) from None

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "stop")

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres", "postgresql"), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    binaries = _postgres_bin()
    if binaries is None:
        unavailable("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="team-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to `postgres`
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    password_file = root / "password"
    password_file.write_text(DB_PASSWORD)
    if as_postgres:
        os.chown(password_file, pwd.getpwnam("postgres").pw_uid, -1)
    data = root / "data"
    subprocess.run([*as_postgres, str(binaries / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=scram-sha-256", f"--pwfile={password_file}"],
                   check=True, capture_output=True)  # fmt: skip

    def start(port: int) -> Postgres:
        server = Postgres(binaries, data, port, as_postgres)
        server.start()
        return server

    server = on_a_free_port(start)
    try:
        for database in ("mlflow", "mlflow_users", "optuna"):
            server.create_database(database)
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Bucket:
    """The team's bucket, on moto's S3 server."""

    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_keys())

    def object_keys(self) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[Bucket]:
    """moto's S3 server on loopback, holding the team's bucket."""
    moto = str(Path(sys.executable).parent / "moto_server")
    with running(lambda port: [moto, "-H", "127.0.0.1", "-p", str(port)], local_env(), "/",
                 tmp_path_factory.mktemp("s3") / "moto.log") as endpoint:  # fmt: skip
        bucket = Bucket(endpoint)
        bucket.client().create_bucket(Bucket=BUCKET)
        yield bucket


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_KEYS["AWS_DEFAULT_REGION"]}  # fmt: skip


@dataclass
class TrackingServer:
    """`mlflow server` with logins, on PostgreSQL and the bucket; restartable (faults)."""

    url: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it (again: on the same port, where its members find it)."""
        since = size_of(self.log_path)
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        until_healthy(self.process, "mlflow server", f"{self.url}/health", self.log_path, since)

    def kill(self) -> None:
        """Gone at once, as a crash would leave it."""
        stop_group(self.process, signal.SIGKILL)

    def stop(self) -> None:
        stop_group(self.process)

    def user_env(self, username: str, password: str, **extra: str) -> dict[str, str]:
        """What a team member sets to work against the server (README, "Team server")."""
        return local_env(MLFLOW_TRACKING_URI=self.url, MLFLOW_TRACKING_USERNAME=username,
                         MLFLOW_TRACKING_PASSWORD=password, **extra)  # fmt: skip


@pytest.fixture(scope="session")
def tracking_server(postgres, s3, tmp_path_factory) -> Iterator[TrackingServer]:
    folder = tmp_path_factory.mktemp("team-server")
    config = folder / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {postgres.url('mlflow_users')}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"
    )
    env = local_env(
        MLFLOW_AUTH_CONFIG_PATH=str(config),
        MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
        MLFLOW_S3_ENDPOINT_URL=s3.endpoint,
        **NO_JOBS,
        # The login pages' CSRF tokens are signed with it; every worker must share it.
        MLFLOW_FLASK_SERVER_SECRET_KEY="team-csrf-key",
        **S3_KEYS,
    )

    def start(port: int) -> TrackingServer:
        # As docs/team-server.md has it: members reach it only by the address they were given.
        command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                   "--allowed-hosts", f"127.0.0.1:{port}",
                   "--backend-store-uri", postgres.url("mlflow"),
                   "--artifacts-destination", f"s3://{BUCKET}/artifacts"]  # fmt: skip
        server = TrackingServer(f"http://127.0.0.1:{port}", command, env, folder / "server.log")
        server.start()
        return server

    server = on_a_free_port(start)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def users(tracking_server) -> dict[str, str]:
    """Team members and their passwords, made by the admin through MLflow's auth API."""
    from mlflow.server.auth.client import AuthServiceClient

    members = {"alice": "alice-password-1", "bob": "bob-password-22"}
    with logged_in(ADMIN, ADMIN_PASSWORD):
        client = AuthServiceClient(tracking_server.url)
        for name, password in members.items():
            client.create_user(name, password)
    return members
