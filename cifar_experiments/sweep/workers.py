"""Workers: each takes trials from the study until its budget is spent, the time is up or a
stop is asked for, and trains each as a child run. This machine's workers run in processes of
their own, sharing its cores; the best trial is registered once the study ends.

    run(...)   -> this machine's workers on the study, then the outcome (and the best registered)
    work(...)  -> one worker's loop over trials
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import signal
import time
import warnings
from multiprocessing.queues import SimpleQueue

import mlflow
import optuna
import torch

from .. import data, engine, experiment, registry
from ..config import ConfigError, TrainConfig
from ..interrupts import Interrupted, StopRequests
from ..tracking import lifecycle
from . import parent_run, study
from .study import FAILURE_ATTR, SURPLUS_ATTR, Outcome, Plan, SweepError

log = logging.getLogger(__name__)


def run(plan: Plan, stop: StopRequests) -> Outcome:
    """Run this machine's workers on the study to its end, under its parent run, then register
    the best trial if the plan says so. Raises Interrupted when stopped (the study continues
    when run again), and registry.RegistrationFailed, carrying the outcome, when only the
    registration failed."""
    with lifecycle.holding(plan.parent_run_id):
        if plan.sweep.workers == 1:
            work(plan, 0, stop)
        else:
            _run_processes(plan, stop)
        outcome = study.outcome(plan)
    if plan.register_as is None or outcome.best_run_id is None:
        return outcome
    gate, alpha = plan.base["gate"], plan.base["gate_alpha"]
    registration = registry.register_finished(
        outcome, outcome.best_run_id, plan.register_as, gate, alpha
    )
    return dataclasses.replace(outcome, registration=registration)


def work(plan: Plan, worker: int, stop: StopRequests) -> None:
    """One worker: trials until the study's budget is spent, the time is up, or a stop."""
    torch.set_num_threads(plan.threads)
    mlflow.set_tracking_uri(plan.tracking_uri)
    objective = Objective(plan, data.load_dataset(plan.base["data"]), stop)  # decoded once
    optuna_study = optuna.load_study(
        study_name=plan.study_name,
        storage=study.rdb_storage(plan.storage),
        pruner=study.pruner(plan.sweep.pruner, plan.base["epochs"]),
    )
    # Each worker draws its own random stream (one stream would propose the same first trials
    # in every worker), reproducible from the sweep's seed and the trials so far.
    seed = plan.base["seed"] * 1000 + 100 * worker + len(optuna_study.trials)
    optuna_study.sampler = study.sampler(plan, seed)
    while stop.pending is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(optuna_study)  # those of workers killed outright
        if study.open_slots(optuna_study, plan.budget) <= 0:
            break
        if plan.deadline is not None and time.time() >= plan.deadline:
            log.info("The sweep's time is up: no new trial starts")
            break
        optuna_study.optimize(objective, n_trials=1, gc_after_trial=True,
                              callbacks=[lambda s, trial: _record(plan, s, trial)])  # fmt: skip
        if objective.interruption is not None:
            raise objective.interruption


def _record(plan: Plan, optuna_study: optuna.Study, finished: optuna.trial.FrozenTrial) -> None:
    if finished.user_attrs.get(SURPLUS_ATTR):
        return
    trials = study.trials_run(optuna_study)
    parent_run.record(
        plan.parent_run_id, optuna_study, trials, study.best(trials), step=finished.number
    )


class Pruning(engine.Callback):
    """Reports each epoch's validation accuracy to the trial, and ends training after an
    epoch the pruner finds hopeless (its own warm-up keeps it from judging early)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def on_epoch_end(
        self, state: engine.TrainingState, epoch: int, metrics: dict[str, float]
    ) -> bool:
        self.trial.report(metrics["val/accuracy"], epoch)
        if epoch < state.config.epochs and self.trial.should_prune():
            self.pruned_at = epoch
        return self.pruned_at is not None


class Objective:
    """Trains one trial as a child run and answers its validation accuracy. A trial that
    cannot train answers NaN, which Optuna records as failed in one line (an exception
    would print its traceback); so does an interrupted one, whose stop is passed on."""

    def __init__(self, plan: Plan, dataset: data.Dataset, stop: StopRequests) -> None:
        self.plan, self.dataset, self.stop = plan, dataset, stop
        self.interruption: Interrupted | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        plan = self.plan
        if study.taken_before(trial) >= plan.budget:  # another worker took the last trial
            trial.set_user_attr(SURPLUS_ATTR, True)
            return math.nan
        params = {name: dimension.suggest(name, trial) for name, dimension in plan.space.items()}
        run_name = f"{plan.study_name}-trial-{trial.number}"
        try:
            config = TrainConfig(**{**plan.base, **params, "run_name": run_name})
        except ConfigError as error:  # values that do not go together: Nesterov, no momentum
            return _failed(trial, str(error))
        prepared = experiment.prepare(config, dataset=self.dataset)
        tags = {parent_run.PARENT_TAG: plan.parent_run_id, parent_run.STUDY_TAG: plan.study_name,
                parent_run.TRIAL_TAG: str(trial.number),
                parent_run.STATE_TAG: "running"}  # fmt: skip
        pruning = Pruning(trial)
        try:
            summary = experiment.train(
                prepared, self.stop, [pruning], tags, progress_bars=plan.sweep.workers == 1
            )
        except Interrupted as interruption:
            parent_run.tag_state(interruption.run_id, "interrupted")
            self.interruption = interruption
            return math.nan
        except Exception as error:  # the trial fails; the sweep goes on
            run_id = parent_run.run_of_trial(
                plan.base["experiment_name"], plan.parent_run_id, trial.number
            )
            parent_run.tag_state(run_id, "failed")
            return _failed(trial, str(error) or type(error).__name__)
        trial.set_user_attr(parent_run.RUN_ATTR, summary.run_id)
        if pruning.pruned_at is not None:
            parent_run.tag_state(summary.run_id, "pruned")
            raise optuna.TrialPruned(f"Stopped after epoch {pruning.pruned_at}.")
        parent_run.tag_state(summary.run_id, "complete")
        return summary.val_accuracy


def _failed(trial: optuna.Trial, reason: str) -> float:
    trial.set_user_attr(FAILURE_ATTR, reason)
    log.warning("Trial %d failed: %s", trial.number, reason)
    return math.nan


def _run_processes(plan: Plan, stop: StopRequests) -> None:
    """Start a process per worker and wait for them. A stop request reaches each as SIGTERM,
    which ends it after its current step, like Ctrl-C (a terminal sends that to all of them
    already; a SIGTERM after a SIGINT changes nothing)."""
    context = multiprocessing.get_context("spawn")  # no torch state forked mid-use
    failures = context.SimpleQueue()  # (process name, last words) of each worker that fails
    processes = [
        context.Process(
            target=_worker_process, args=(plan, worker, failures), name=f"worker-{worker}"
        )
        for worker in range(plan.sweep.workers)
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
        raise SweepError(f"{crashed[0].name} failed (exit status {crashed[0].exitcode}): {reason}")
    if any(p.exitcode for p in processes):
        raise Interrupted(signal.SIGTERM)  # someone stopped a worker itself


def _interrupted_codes() -> tuple[int, ...]:
    return tuple(Interrupted(signum).exit_code for signum in (signal.SIGINT, signal.SIGTERM))


def _worker_process(plan: Plan, worker: int, failures: SimpleQueue[tuple[str, str]]) -> None:
    """A worker in a process of its own, its name on its lines (and no progress bars: those of
    several processes would overwrite each other). An error it did not expect ends it with its
    traceback, and its one line goes to the parent, which ends the sweep with it."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[worker {worker}] %(message)s"))
    package_log = logging.getLogger("cifar_experiments")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    with StopRequests().installed() as stop:
        try:
            work(plan, worker, stop)
        except Interrupted as interruption:
            raise SystemExit(interruption.exit_code) from None
        except Exception as error:
            name = multiprocessing.current_process().name
            failures.put((name, f"{type(error).__name__}: {study.one_line(error)}"))
            raise
