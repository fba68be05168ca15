"""The team stack's fixed names and secrets (conftest.py starts it; tests log in with them)."""

import contextlib
from collections.abc import Iterator

import pytest

ADMIN, ADMIN_PASSWORD = "admin", "team-admin-password-1"
DB_PASSWORD = "pg-secret-7"
BUCKET = "team-artifacts"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "moto-secret-key-9",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


@contextlib.contextmanager
def logged_in(username: str, password: str) -> Iterator[None]:
    """MLflow's client in this process, as `username`, for the block."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", username)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield
