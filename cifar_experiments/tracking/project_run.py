"""`mlflow run` starts this program inside a run it has made, named in MLFLOW_RUN_ID.

This module alone reads that variable, once, as a command starts (cli.py), and takes it out of
the environment: from there the run is handed down by name, and the processes a sweep starts
make runs of their own instead of taking it over.
"""

from __future__ import annotations

import os

ENV = "MLFLOW_RUN_ID"


def take() -> str | None:
    """The run `mlflow run` made for this process, if it started it; the variable is removed."""
    return os.environ.pop(ENV, None) or None


def hand_on(run_id: str | None) -> None:
    """Put `run_id` back for the processes this one starts to train in it (torchrun's ranks)."""
    if run_id is not None:
        os.environ[ENV] = run_id
