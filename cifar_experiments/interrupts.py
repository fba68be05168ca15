"""Ctrl-C and SIGTERM end a run cleanly: training stops between two optimiser steps, where its
state is whole and can be checkpointed, and everything else stops at once."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The process was asked to stop. `exit_code` is the shell's: 130 for SIGINT, 143 for
    SIGTERM. `checkpointed` says whether the training state at the stop was saved, and
    `run_id` names the run it stopped, once one was started."""

    def __init__(self, signum: int, checkpointed: bool = False) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.checkpointed = checkpointed
        self.run_id: str | None = None
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """Turns SIGINT and SIGTERM into `Interrupted`.

    Inside `deferred()` (the training loop) a signal only sets `pending`, which the loop reads
    between steps. A second signal of the same kind, from someone who really wants out, raises
    at once; a SIGTERM after a SIGINT does not, because that is how `mlflow run` cancels the
    process it started when its own terminal got the Ctrl-C.

    Under torchrun (`shared_by`, the ranks' agreement on a stop: distributed.World) a signal
    is never asked twice: torchrun forwards the terminal's Ctrl-C to the ranks that have just
    got it, and kills any rank still running 30 s later.
    """

    def __init__(self, shared_by: Callable[[int | None], int | None] | None = None) -> None:
        self.pending: int | None = None
        self._deferring = False
        self._shared_by = shared_by

    def agreed(self) -> int | None:
        """The stop pending in this process, or in any that trains with it."""
        return self._shared_by(self.pending) if self._shared_by else self.pending

    @contextmanager
    def installed(self) -> Iterator[StopRequests]:
        # Python lets only the main thread install handlers; elsewhere signals keep their defaults.
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._on_signal) for signum in SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _on_signal(self, signum: int, frame: object) -> None:
        again = signum == self.pending and self._shared_by is None
        if self._deferring and self.pending in (None, signal.SIGINT) and not again:
            if self.pending is None:
                self.pending = signum
                at_once = "" if self._shared_by else " (send it again to stop at once)"
                log.warning(
                    "%s received: stopping after this step and saving a checkpoint%s",
                    signal.Signals(signum).name, at_once,
                )  # fmt: skip
            return
        raise Interrupted(self.pending or signum)


def interruption(error: BaseException | None) -> BaseException | None:
    """The stop request (Ctrl-C, SIGTERM) behind `error`, if any. One raised while a library was
    at work reaches us wrapped in that library's error: MLflow's SQL store turns whatever stops
    a write into its own internal error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt | Interrupted):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
