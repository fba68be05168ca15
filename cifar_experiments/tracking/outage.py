"""A tracking server that stops answering mid-run: told apart from other errors, and said in
a line that names the server, the reason and what is kept."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mlflow.exceptions import MlflowException

from .refusals import server
from .store import TrackingError, tracking_uri


class ServerLost(TrackingError):
    """The tracking server stopped answering during a run, for longer than MLflow retries
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES); the run's checkpoint, if it has one, is kept."""

    def __init__(self, run_id: str, checkpoint: Path | None, error: MlflowException) -> None:
        self.run_id = run_id
        self.checkpoint = checkpoint if checkpoint is not None and checkpoint.is_file() else None
        kept = (
            f"its checkpoint is in {self.checkpoint}"
            if self.checkpoint is not None
            else "it stopped before its first checkpoint"
        )
        super().__init__(
            f"lost the tracking server {tracking_uri()} ({why_unanswered(error)}) during run "
            f"{run_id}; {kept}"
        )


def server_lost(error: BaseException) -> bool:
    """Whether `error` is the tracking server not answering, or failing, after MLflow's
    retries: no connection, a timeout, or a 5xx answer (its database down, say)."""
    if not isinstance(error, MlflowException):
        return False
    return error.message.startswith("API request to ") or error.get_http_status_code() >= 500


def why_unanswered(error: object) -> str:
    """The gist of an HTTP failure: MLflow's message nests urllib3's, which nests its cause."""
    message = getattr(error, "message", None) or str(error)
    for pattern in (
        r"\[Errno -?\d+\] ([^\"')]+)",  # the OS's: connection refused, no route to host
        r"ResponseError\('([^']+)'",  # urllib3's: too many 503 error responses
        r"ProtocolError\('([^'.]+)",  # the server gone mid-request: connection aborted
    ):
        found = re.search(pattern, message)
        if found:
            return found.group(1).strip().lower()
    if "timeout" in message.lower():
        return "no answer in time"
    return " ".join(message.split())[:200]


class RetryLines(logging.StreamHandler):
    """urllib3's word that MLflow's client tries a request again, because the server refused
    or dropped the connection, said on stderr in a line a user can read: a training that waits
    on the server says so instead of falling silent for minutes. urllib3's other records are
    dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        said = record.args
        if not str(record.msg).startswith("Retrying ") or not isinstance(said, tuple):
            return False
        retries, error = said[0], said[1]
        left = getattr(retries, "total", None)
        record.msg = (
            f"The tracking server {server()} did not answer ({why_unanswered(error)}); MLflow "
            f"tries again{f' (retries left: {left})' if isinstance(left, int) else ''}"
        )
        record.args = ()
        return True


def show_retries() -> None:
    """Say each retry of MLflow's client in a line on stderr (this command's stderr: a command
    run again in one process replaces the handler)."""
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    for handler in [h for h in urllib3_log.handlers if isinstance(h, RetryLines)]:
        urllib3_log.removeHandler(handler)
    urllib3_log.addHandler(RetryLines())
