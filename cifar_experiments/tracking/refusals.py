"""A tracking server's refusal, or its silence, said in one line whatever command met it: the
server (without credentials), the login, what happened and what to do about it. MLflow raises
all of these as MlflowException; its message tells them apart.

    said(error, command)  -> the line, or None for an error that is not the server's answer
    login()               -> who this process is logged in as, for such lines
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.exceptions import MlflowException

from ..processes import one_line

# How MLflow says there is no such run, model, version or alias (an id it cannot even read
# is an invalid parameter): the user's mistake, not the server's refusal.
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
# What to ask for when the server refused a login its permission.
PERMISSIONS = (
    "ask the owner of what you used, or an admin, for the permission it needs (READ to see "
    "runs and models, EDIT to add runs and versions, MANAGE to grant)"
)


def server() -> str:
    """The tracking server's address as the user set it, less any user and password in it."""
    parts = urlsplit(mlflow.get_tracking_uri())
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def login() -> str:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    return repr(user) if user else "an anonymous login"


def said(error: BaseException, command: str | None = None) -> str | None:
    """One line for a server's refusal or silence met by `command` (a command's name, when
    known); None for other errors, and for stores that are not servers."""
    if not isinstance(error, MlflowException) or not server().startswith(("http:", "https:")):
        return None
    at, message = f"the tracking server {server()}", error.message
    doing = f" in `{command}`" if command else ""
    if error.error_code == "UNAUTHENTICATED":
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if user is None:
            return f"{at} needs a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        return f"{at} refused the login of {user!r}: check MLFLOW_TRACKING_PASSWORD"
    if error.error_code == "PERMISSION_DENIED":
        return f"{at} refused {login()}{doing} ({one_line(error)}): {PERMISSIONS}"
    if error.error_code == "RESOURCE_DOES_NOT_EXIST":
        return f"{at} found nothing{doing}: {one_line(error)}"
    failed = re.search(r"too many (\d{3}) error responses", message)
    if failed:
        return (
            f"{at} failed (HTTP {failed.group(1)}){doing}: try again, and if it goes on, tell "
            "its admin (its log says why)"
        )
    if "not in a valid JSON format" in message:
        return (
            f"{at} answered{doing} with a web page, not MLflow's API: set MLFLOW_TRACKING_URI "
            "to the MLflow server itself (behind a proxy, its MLflow path)"
        )
    if "Max retries exceeded" in message or "Connection aborted" in message:
        return (
            f"cannot reach {at}{doing}: it refused or closed the connection; is it running, "
            "and is MLFLOW_TRACKING_URI its address?"
        )
    return None
