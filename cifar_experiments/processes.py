"""Work shared out to processes of their own on this machine (a sweep's workers, a training's
repeats), each with its share of the cores: torch starts a thread per core in every process,
and processes that each took all of them would take turns at every step."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.queues import SimpleQueue

from .interrupts import Interrupted, StopRequests

Work = Callable[[int, StopRequests], None]  # worker number, its stop requests


class WorkerFailed(RuntimeError):
    """A worker ended with an error it did not expect; the message names it and the error."""


def cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """Each worker's share of the cores (at least one thread)."""
    if workers > cores():
        logging.getLogger(__name__).warning(
            "%d workers on %d cores: each gets one thread, and they take turns", workers, cores()
        )
    return max(1, cores() // workers)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def run(work: Work, workers: int, stop: StopRequests) -> None:
    """`work(worker, stop)` in a process per worker, then wait for them all. `work` must be
    picklable (a module's function, or a partial of one). A stop request reaches each worker
    as SIGTERM, which ends it after its current step, like Ctrl-C (a terminal sends that to
    all of them already; a SIGTERM after a SIGINT changes nothing). Raises Interrupted when
    stopped, and WorkerFailed with the first failing worker's error."""
    context = multiprocessing.get_context("spawn")  # no torch state forked mid-use
    failures = context.SimpleQueue()  # (process name, last words) of each worker that fails
    processes = [
        context.Process(target=_worker, args=(work, worker, failures), name=f"worker-{worker}")
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    forwarded = False
    try:
        with stop.deferred():
            while any(process.is_alive() for process in processes):
                if stop.pending is not None and not forwarded:
                    for process in processes:
                        if process.is_alive() and process.pid is not None:
                            os.kill(process.pid, signal.SIGTERM)
                    forwarded = True
                time.sleep(0.2)
    finally:
        for process in processes:
            if process.is_alive():  # a second Ctrl-C: stop at once
                process.terminate()
            process.join()
    if stop.pending is not None:
        raise Interrupted(stop.pending)
    crashed = [p for p in processes if p.exitcode not in (0, *_interrupted_codes())]
    if crashed:
        said = {}
        while not failures.empty():
            name, last_words = failures.get()
            said[name] = last_words
        reason = said.get(crashed[0].name, "its output says why")
        raise WorkerFailed(
            f"{crashed[0].name} failed (exit status {crashed[0].exitcode}): {reason}"
        )
    if any(p.exitcode for p in processes):
        raise Interrupted(signal.SIGTERM)  # someone stopped a worker itself


def _interrupted_codes() -> tuple[int, ...]:
    return tuple(Interrupted(signum).exit_code for signum in (signal.SIGINT, signal.SIGTERM))


def _worker(work: Work, worker: int, failures: SimpleQueue[tuple[str, str]]) -> None:
    """A worker in a process of its own, its name on its lines (and no progress bars: those of
    several processes would overwrite each other). An error it did not expect ends it with its
    traceback, and its one line goes to the parent, which ends the work with it."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[worker {worker}] %(message)s"))
    package_log = logging.getLogger("cifar_experiments")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    with StopRequests().installed() as stop:
        try:
            work(worker, stop)
        except Interrupted as interruption:
            raise SystemExit(interruption.exit_code) from None
        except Exception as error:
            name = multiprocessing.current_process().name
            failures.put((name, f"{type(error).__name__}: {one_line(error)}"))
            raise
