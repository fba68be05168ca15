"""Where to see a run or a model version in the MLflow UI, as links that open its
model-training view."""

from __future__ import annotations

import urllib.parse

import mlflow

from .store import tracking_uri

# Without this in the address, the UI shows its GenAI pages to a browser that last used them.
TRAINING_VIEW = "?workflowType=machine_learning"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` listens unless told otherwise


def run_page(run_id: str) -> str:
    """The UI page of a run, in the model-training view; see `browse`."""
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    return f"#/experiments/{experiment_id}/runs/{run_id}{TRAINING_VIEW}"


def model_version_page(name: str, version: str) -> str:
    return f"#/models/{urllib.parse.quote(name)}/versions/{version}"


def browse(page: str) -> str:
    """How to see `page` of the UI: the tracking server's own address, or, for a store on this
    machine, the command that starts the UI and the address it will answer at."""
    uri = mlflow.get_tracking_uri()
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https"):
        # Credentials never travel in the address: each user sets MLFLOW_TRACKING_USERNAME.
        server = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="")
        return f"open {server.geturl().rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri()}, then open {UI_ADDRESS}/{page}"
