"""Training state on disk: written atomically, read back without running any pickled code."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Bump when the layout of the saved dictionary changes.
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file and the reason."""


def save(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` through a temporary file and a rename, so a crash or a full
    disk leaves the previous checkpoint whole."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    # Serialised in memory first: torch's own zip writer reports a full disk as a RuntimeError
    # about file positions; a plain write says "No space left on device".
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            file.write(buffer.getbuffer())
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write checkpoint {path}: {error.strerror or error}"
        ) from error


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU. Only tensors and plain Python values are accepted."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # torch raises several kinds for damaged or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this version of cifar-experiments")
    return state


def check_writable(folder: Path) -> None:
    """Fail now, not after an epoch, when checkpoints cannot be written to `folder`."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as error:
        raise CheckpointError(
            f"cannot write checkpoints to {folder}: {error.strerror or error}"
        ) from error


@dataclass(frozen=True)
class CheckpointFile:
    """Where a run keeps its training state (`engine.TrainingState.state_dict()`), and what
    the run was asked to do, saved beside the state so a resume can be checked against it."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, training: dict[str, Any]) -> None:
        save({"training": training, "meta": self.meta}, self.path)
